"""Where the library's progress and result lines go: the `classifier` logger, shown as plain lines.

Every module reports with `log = logging.getLogger(__name__)`, so all its records fall under the `classifier`
logger. `configure()` gives that logger one handler that writes each message as it is (no level, no logger name)
to standard output, or to standard error when the call passes `extra=STDERR`: the notes that must not mix with
machine-readable output such as predict's CSV or evaluate's JSON on stdout. The command line therefore shows the
lines, on the streams, that it showed when these were `print` calls.

`configure()` runs when the package is imported (`classifier/__init__.py`), not only in the entry points: every
entry point imports the package first, and a notebook or script calling `train(...)` saw these lines before too.
Without a handler they would reach only logging's last-resort handler, which drops everything below WARNING. A
program that imports the library quiets it with `logging.getLogger("classifier").setLevel(logging.WARNING)` (a
level set before the import is kept), or routes it into its own handlers with
`logger.handlers.clear(); logger.propagate = True`.
"""

from __future__ import annotations

import logging
import sys

# `log.info(..., extra=STDERR)`: this line goes to standard error, as `print(..., file=sys.stderr)` did.
STDERR = {"to_stderr": True}


class ConsoleHandler(logging.Handler):
    """Writes each record's message and a newline to the current `sys.stdout` (or `sys.stderr`, see `STDERR`).

    The stream is looked up on every record, not bound once as `logging.StreamHandler(sys.stdout)` does, because
    `sys.stdout` is replaced at run time (pytest's capsys, `contextlib.redirect_stdout`). A failed write (a closed
    pipe, a full disk) raises to the caller as `print` did, where `errors.run_cli` reports it, instead of logging's
    "--- Logging error ---" traceback.
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Writes one line and flushes it, so that a line announcing a long step shows before it, also in a pipe."""
        stream = sys.stderr if getattr(record, "to_stderr", False) else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


def configure() -> None:
    """Gives the `classifier` logger its console handler, once.

    The level becomes INFO unless one was set before. `propagate` is off because the root logger often has a
    handler of its own: absl's in absl.app programs, or the default one the first module-level `logging.info(...)`
    (absl's too, which Keras logs through) adds; a record reaching it would show a second time, in its format.
    """
    logger = logging.getLogger("classifier")
    if not any(isinstance(handler, ConsoleHandler) for handler in logger.handlers):
        logger.addHandler(ConsoleHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False
