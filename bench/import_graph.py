"""The package's import graph, and the arrows that point the wrong way: a command module importing another one.

    python bench/import_graph.py            # this checkout
    python bench/import_graph.py --root DIR # another checkout, e.g. a `git worktree` of an older commit

Command modules (what `classifier COMMAND` runs) sit on top; everything else is library below them. A command may
import library modules; a library module may import library modules; nothing imports a command module (except
`classifier.cli`, which dispatches to them by name). Reads the source with `ast` (nothing is imported), so it runs
without TensorFlow and on any commit. Exits 1 when an arrow points up.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

COMMANDS = {"train", "export", "evaluate", "predict", "explain", "benchmark"}


def imports_of(path: Path) -> set[str]:
    """The `classifier.*` modules a file imports (`from classifier import x` counts as module x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("classifier.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "classifier":
                found |= {a.name for a in node.names}
            elif node.module.startswith("classifier."):
                found.add(node.module.split(".")[1])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="checkout to read")
    root = Path(parser.parse_args().root)
    modules = sorted(p for p in (root / "classifier").glob("*.py") if p.stem not in ("__init__", "__main__", "cli"))
    graph = {p.stem: sorted(imports_of(p) - {p.stem}) for p in modules}
    upward = [(a, b) for a, targets in graph.items() for b in targets if b in COMMANDS]
    for name, targets in graph.items():
        kind = "command" if name in COMMANDS else "library"
        print(f"{name:18s} {kind:8s} -> {', '.join(targets) or '-'}")
    print(f"\n{len(graph)} modules, {sum(map(len, graph.values()))} imports; arrows up (into a command module): "
          + (", ".join(f"{a} -> {b}" for a, b in upward) or "none"))  # fmt: skip
    return 1 if upward else 0


if __name__ == "__main__":
    sys.exit(main())
