"""`classifier explain --model RUN/model.keras INPUT... --output DIR`: where in each image the model found its evidence.

Inputs are files, folders or glob patterns, as for `classifier predict`, read as training read them (the run's
resize mode and DICOM window). DIR receives, per image, `<name>.gradcam.png` (the image as the model saw it, and
the Grad-CAM heatmap over it), `contact_sheet.png` with every overlay and its class (pages of 64 images:
`contact_sheet_01.png`, ...), and `gradcam.csv` (file, overlay, explained and predicted class, probabilities).

The class explained is the one `predict` reports (for a two-class model with an operating point, the decision at
its threshold), or `--class NAME` for every image (e.g. "where is the evidence for 'pneumonia' in this normal
film?"). Only the Keras model can be explained (classifier/gradcam.py says why and what a heatmap does not mean).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from classifier.errors import UserError, run_cli
from classifier.inference import (
    add_dicom_arguments,
    class_labels,
    collect_inputs,
    input_settings,
    open_model,
)
from classifier.log import STDERR
from classifier.operating_point import decision_function, decision_rule
from classifier.run import Run

log = logging.getLogger(__name__)


def explain(
    model: str | os.PathLike,
    inputs: Sequence[str],
    output: str | os.PathLike,
    *,
    class_name: str | None = None,
    batch_size: int = 16,
    resize_mode: str | None = None,
    threshold: float | None = None,
    use_operating_point: bool = True,
    dicom_window: str | None = None,
    dicom_frames: str | None = None,
) -> dict:
    """Writes Grad-CAM overlays of image files and their contact sheet.

    Args:
        model: A model.keras (TFLite and SavedModel files are refused, naming the run's model.keras).
        inputs: Files, folders (recursive) or glob patterns.
        output: Folder to write into (created).
        class_name: Explain this class for every image; None explains each image's predicted class.
        batch_size: Images per gradient computation.
        resize_mode: Default the run's data.resize_mode, else the input contract's, else "stretch".
        threshold: Two-class models: the predicted class is the second at probability >= this.
        use_operating_point: Two-class models: predict with the stored operating point when there is one.
        dicom_window: Default the run's data.dicom_window.
        dicom_frames: Default the run's data.dicom_frames.

    Returns:
        `gradcam.explain_files`'s result, plus "model" and "skipped" (inputs that matched nothing).

    Raises:
        UserError: a model that cannot be explained, no input images, an unknown class, a bad output folder.
    """
    from classifier import data, gradcam

    gradcam.refuse_unexplainable(model)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give 1 or more images per batch")
    files, problems = collect_inputs(inputs)
    for problem in problems:
        log.warning(f"skipped {problem['path']}: {problem['error']}", extra=STDERR)
    if not files:
        raise UserError(
            f"no image files found in {', '.join(map(repr, inputs)) or 'the arguments'}: pass existing files, folders "
            "holding images, or quoted glob patterns such as 'scans/**/*.png'"
        )
    output = gradcam.prepare_output_dir(output)
    resize_mode, decoding = input_settings(
        model, Run.of_model(model), resize_mode=resize_mode, dicom_window=dicom_window, dicom_frames=dicom_frames
    )
    files = [ref for path in files for ref in data.frame_refs(path, decoding)]
    predictor = open_model(model)
    labels = class_labels(predictor)
    chosen = None
    if class_name is not None:
        if class_name not in labels:
            raise UserError(f"--class '{class_name}' is not a class of this model: use one of {', '.join(labels)}")
        chosen = labels.index(class_name)
    rule = decision_rule(predictor, labels, threshold, use_operating_point)
    result = gradcam.explain_files(
        predictor.model,
        files,
        output,
        labels,
        classes=chosen,
        decide=decision_function(rule),
        resize_mode=resize_mode,
        decoding=decoding,
        batch_size=batch_size,
        on_error=lambda path, reason: log.warning(f"skipped {path}: {reason}", extra=STDERR),
    )
    return {"model": str(model), **result, "skipped": problems}


def build_parser() -> argparse.ArgumentParser:
    """The `classifier explain` options."""
    parser = argparse.ArgumentParser(
        prog="classifier explain",
        description="Grad-CAM heatmaps of image files: one overlay PNG per image, a contact sheet of all of them, "
        "and gradcam.csv. A heatmap shows where the evidence for a class was, not a segmentation and not a reason.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--model", required=True, help="the run's model.keras (TFLite and SavedModel cannot be)")
    parser.add_argument("--output", required=True, help="folder for the overlays, contact sheet and gradcam.csv")
    parser.add_argument(
        "--class", dest="class_name", default=None, help="explain this class for every image (default: predicted)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per gradient computation (default 16)")
    parser.add_argument(
        "--resize-mode", choices=("stretch", "crop"), default=None, help="default: the run's data.resize_mode"
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="two-class models: the predicted class is the second at p >= this"
    )
    parser.add_argument(
        "--no-operating-point", action="store_true", help="ignore operating_point.json: predicted = most probable"
    )
    add_dicom_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`classifier explain`: exit 0 when at least one image was explained, 1 when none could be read."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        result = explain(
            args.model,
            args.inputs,
            args.output,
            class_name=args.class_name,
            batch_size=args.batch_size,
            resize_mode=args.resize_mode,
            threshold=args.threshold,
            use_operating_point=not args.no_operating_point,
            dicom_window=args.dicom_window,
            dicom_frames=args.dicom_frames,
        )
        done = sum(row["error"] is None for row in result["rows"])
        log.info(
            f"wrote {done} Grad-CAM overlay(s), {len(result['contact_sheets'])} contact sheet(s) and "
            f"{Path(result['summary']).name} to {result['output_dir']}",
            extra=STDERR,
        )
        return 0 if done else 1

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
