"""`classifier predict --model M INPUT...`: class names and probabilities for image files, as CSV or JSON.

Inputs are files, folders (searched recursively for image files, DICOM included) or glob patterns. Images are read
exactly as in training (`data.load_and_resize` with the run's resize mode and DICOM window, or those of the input
contract the model carries when it was copied away from its run), in batches, with a progress bar on a terminal.
With the run's `dicom_frames: all`, every frame of a multi-frame DICOM file gets its own row (`<file>#frame=N`). A
file that cannot be read is reported on stderr and as a row with its error, and never stops the run.

For a two-class model with an operating point (`operating_point.json` beside the model or in its run folder, see
`classifier.operating_point`), the `label` column is the decision at that threshold; otherwise it is the most
probable class. Probabilities are calibrated: the temperature training fitted is inside every model file.

`--explain DIR` (model.keras only) also writes a Grad-CAM overlay of each image for its `label` into DIR, with a
contact sheet of all of them (`classifier.gradcam`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classifier import atomic
from classifier.errors import UserError, run_cli
from classifier.inference import (
    Predictor,
    add_dicom_arguments,
    check_report_path,
    class_labels,
    collect_inputs,
    input_settings,
    open_model,
    predict_files,
)
from classifier.log import STDERR
from classifier.operating_point import decision_function, decision_rule
from classifier.run import Run

if TYPE_CHECKING:
    from classifier.data import Decoding

log = logging.getLogger(__name__)

FORMATS = ("csv", "json")


def prediction_rows(
    paths: Sequence[str],
    probabilities: np.ndarray,
    errors: dict[int, str],
    labels: list[str],
    top_k: int,
    rule: dict | None = None,
) -> list[dict]:
    """One dict per file: path, label (the decision), top_k [{label, probability}], error; plus
    positive_probability when a threshold rule applies."""
    rows = []
    for index, path in enumerate(paths):
        row: dict = {"path": path, "label": None, "top_k": [], "error": errors.get(index)}
        if rule is not None:
            row["positive_probability"] = None
        if index not in errors:
            scores = probabilities[index]
            order = np.argsort(-scores, kind="stable")[:top_k]
            row["top_k"] = [{"label": labels[i], "probability": round(float(scores[i]), 6)} for i in order]
            row["label"] = labels[int(order[0])]
            if rule is not None:
                p_positive = float(scores[rule["positive_index"]])
                row["positive_probability"] = round(p_positive, 6)
                row["label"] = labels[
                    rule["positive_index"] if p_positive >= rule["threshold"] else 1 - rule["positive_index"]
                ]
        rows.append(row)
    return rows


def to_csv(rows: list[dict], top_k: int, rule: dict | None) -> str:
    """CSV text: path, label, [positive_probability, threshold,] class_1, probability_1, ..., error."""
    header = ["path", "label"]
    if rule is not None:
        header += ["positive_probability", "threshold"]
    for rank in range(1, top_k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    header.append("error")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        line = [row["path"], row["label"] or ""]
        if rule is not None:
            p_positive = row.get("positive_probability")
            line += ["" if p_positive is None else p_positive, rule["threshold"]]
        for rank in range(top_k):
            entry = row["top_k"][rank] if rank < len(row["top_k"]) else {"label": "", "probability": ""}
            line += [entry["label"], entry["probability"]]
        line.append(row["error"] or "")
        writer.writerow(line)
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class _Reader:
    """The model and how images are read and decided for it, shared by the steps of `predict`.

    Attributes:
        predictor: The opened model.
        labels: Class names in output order.
        rule: The two-class threshold rule (`operating_point.decision_rule`), or None for the most probable class.
        resize_mode: How images are resized.
        decoding: How image files are decoded (DICOM window and frames).
    """

    predictor: Predictor
    labels: list[str]
    rule: dict | None
    resize_mode: str
    decoding: Decoding


def predict(
    model: str | os.PathLike,
    inputs: Sequence[str],
    *,
    top_k: int = 3,
    batch_size: int = 32,
    threads: int | None = None,
    resize_mode: str | None = None,
    threshold: float | None = None,
    use_operating_point: bool = True,
    dicom_window: str | None = None,
    dicom_frames: str | None = None,
    explain_dir: str | os.PathLike | None = None,
) -> dict:
    """Classifies image files.

    Args:
        model: model.keras, a SavedModel folder or a .tflite file.
        inputs: Files, folders (recursive) or glob patterns.
        top_k: Classes listed per image (capped at the number of classes).
        batch_size: Images per model call.
        threads: CPU threads (see `open_model`).
        resize_mode: "stretch" or "crop"; default the run's setting (config.yaml beside or above the model), else
            the input contract's (inside or beside the model), else "stretch".
        threshold: Two-class models: call the positive (second) class at probability >= this.
        use_operating_point: Two-class models: use the stored operating point when there is one.
        dicom_window: As `data.dicom_window`; default the run's setting, else the input contract's, else "auto".
        dicom_frames: As `data.dicom_frames` ("first" or "all"); default the run's setting, else the input
            contract's, else "first".
        explain_dir: Also write a Grad-CAM overlay of every readable image for its label, and a contact sheet,
            into this folder (model.keras only).

    Returns:
        {"model", "kind", "labels", "image_size", "resize_mode", "decoding", "decision" (None or the threshold
        rule), "count", "errors" (number of unreadable inputs), "predictions": `prediction_rows`, "explain": None
        or {"output_dir", "contact_sheets", "summary"}}.

    Raises:
        UserError: no input, a bad option, a model that cannot be loaded, or `explain_dir` with a TFLite or
            SavedModel model or a folder that cannot be written.
    """
    _check_request(model, inputs, top_k, explain_dir)
    files, problems = _find_images(inputs)
    resize_mode, decoding = input_settings(
        model, Run.of_model(model), resize_mode=resize_mode, dicom_window=dicom_window, dicom_frames=dicom_frames
    )
    files = _frames(files, decoding)
    reader = _open(model, decoding, threads, resize_mode, threshold, use_operating_point)
    probabilities, errors = predict_files(
        reader.predictor,
        files,
        resize_mode=reader.resize_mode,
        batch_size=batch_size,
        on_error=lambda path, reason: log.warning(f"skipped {path}: {reason}", extra=STDERR),
        decoding=decoding,
    )
    top_k = min(top_k, len(reader.labels))
    rows = prediction_rows(files, probabilities, errors, reader.labels, top_k, reader.rule)
    explained = _explain(reader, rows, explain_dir, batch_size) if explain_dir is not None else None
    rows += [{"path": p["path"], "label": None, "top_k": [], "error": p["error"]} for p in problems]
    return {
        "model": str(model),
        "kind": reader.predictor.kind,
        "labels": reader.labels,
        "image_size": reader.predictor.image_size,
        "resize_mode": reader.resize_mode,
        "decoding": dataclasses.asdict(decoding),
        "decision": reader.rule,
        "top_k": top_k,
        "count": len(rows),
        "errors": len(errors) + len(problems),
        "predictions": rows,
        "explain": explained,
    }


def _check_request(
    model: str | os.PathLike, inputs: Sequence[str], top_k: int, explain_dir: str | os.PathLike | None
) -> None:
    """Refuses a request that cannot work before any image is read (and makes sure `explain_dir` is writable)."""
    if not inputs:
        raise UserError("no input images: pass image files, folders or glob patterns after the options")
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: give 1 or more")
    if explain_dir is not None:
        from classifier import gradcam

        gradcam.refuse_unexplainable(model)
        gradcam.prepare_output_dir(explain_dir)


def _find_images(inputs: Sequence[str]) -> tuple[list[str], list[dict]]:
    """(image files, problems) of the inputs; each problem is reported on stderr, and none found is an error."""
    files, problems = collect_inputs(inputs)
    for problem in problems:
        log.warning(f"skipped {problem['path']}: {problem['error']}", extra=STDERR)
    if not files:
        raise UserError(
            f"no image files found in {', '.join(map(repr, inputs))}: pass existing files, folders holding "
            "images, or quoted glob patterns such as 'scans/**/*.png'"
        )
    return files, problems


def _frames(files: list[str], decoding: Decoding) -> list[str]:
    """The inputs to predict: each file, or with `dicom_frames: all` each frame of a DICOM file (`data.frame_ref`)."""
    from classifier import data

    return [ref for path in files for ref in data.frame_refs(path, decoding)]


def _open(
    model: str | os.PathLike,
    decoding: Decoding,
    threads: int | None,
    resize_mode: str,
    threshold: float | None,
    use_operating_point: bool,
) -> _Reader:
    """Opens the model and settles its labels and decision rule."""
    predictor = open_model(model, threads)
    labels = class_labels(predictor)
    rule = decision_rule(predictor, labels, threshold, use_operating_point)
    return _Reader(predictor, labels, rule, resize_mode, decoding)


def _explain(reader: _Reader, rows: list[dict], explain_dir: str | os.PathLike, batch_size: int) -> dict:
    """Writes the Grad-CAM overlays of the readable images, each for its label; returns where they went."""
    from classifier import gradcam

    readable = [row for row in rows if row["error"] is None]
    explained = gradcam.explain_files(
        reader.predictor.model,
        [row["path"] for row in readable],
        explain_dir,
        reader.labels,
        classes=[reader.labels.index(row["label"]) for row in readable],
        decide=decision_function(reader.rule),
        resize_mode=reader.resize_mode,
        decoding=reader.decoding,
        batch_size=min(batch_size, 16),
    )
    return {key: explained[key] for key in ("output_dir", "contact_sheets", "summary")}


def build_parser() -> argparse.ArgumentParser:
    """The `classifier predict` options."""
    parser = argparse.ArgumentParser(
        prog="classifier predict",
        description="Classify image files, folders (recursively) or glob patterns; CSV or JSON out.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--model", required=True, help="model.keras, a SavedModel folder or a .tflite file")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per image (default 3)")
    parser.add_argument(
        "--format", choices=FORMATS, default=None, help="csv or json (default: from --output, else csv)"
    )
    parser.add_argument("--output", default=None, help="write to this file instead of stdout")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: runtime's)")
    parser.add_argument(
        "--resize-mode", choices=("stretch", "crop"), default=None, help="default: the run's data.resize_mode"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="two-class models: call the second class at probability >= this (overrides operating_point.json)",
    )
    parser.add_argument(
        "--no-operating-point", action="store_true", help="ignore operating_point.json: label = most probable class"
    )
    parser.add_argument(
        "--explain",
        default=None,
        metavar="DIR",
        help="also write a Grad-CAM overlay per image (for its label) and a contact sheet into DIR (model.keras only)",
    )
    add_dicom_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`classifier predict`: exit 0 when at least one image was classified, 1 when none could be read."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        fmt = args.format or ("json" if args.output and args.output.lower().endswith(".json") else "csv")
        if args.output:
            check_report_path(args.output)  # before the predictions, which a bad path would otherwise lose
        result = predict(
            args.model,
            args.inputs,
            top_k=args.top_k,
            batch_size=args.batch_size,
            threads=args.threads,
            resize_mode=args.resize_mode,
            threshold=args.threshold,
            use_operating_point=not args.no_operating_point,
            dicom_window=args.dicom_window,
            dicom_frames=args.dicom_frames,
            explain_dir=args.explain,
        )
        if result["explain"]:
            sheets = ", ".join(Path(path).name for path in result["explain"]["contact_sheets"])
            log.info(f"wrote Grad-CAM overlays and {sheets} to {result['explain']['output_dir']}", extra=STDERR)
        if fmt == "json":
            text = json.dumps(result, indent=2) + "\n"
        else:
            text = to_csv(result["predictions"], result["top_k"], result["decision"])
        if args.output:
            atomic.write_text(args.output, text)  # a temporary name of its own: two runs into one file do not collide
            done = result["count"] - result["errors"]
            log.info(f"wrote {done} prediction(s) and {result['errors']} error(s) to {args.output}", extra=STDERR)
        else:
            sys.stdout.write(text)
        return 0 if result["count"] > result["errors"] else 1

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
