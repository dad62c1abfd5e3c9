"""`classifier predict --model M INPUT...`: class names and probabilities for image files, as CSV or JSON.

Inputs are files, folders (searched recursively for image files, DICOM included) or glob patterns. Images are read
exactly as in training (`data.load_and_resize` with the run's resize mode and DICOM window), in batches, with a
progress bar on a terminal. With the run's `dicom_frames: all`, every frame of a multi-frame DICOM file gets its own
row (`<file>#frame=N`). A file that cannot be read is reported on stderr and as a row with its error, and never stops
the run.

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
import glob
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from classifier.errors import UserError, run_cli
from classifier.run import LABELS_FILE, Run

FORMATS = ("csv", "json")
_GLOB_CHARACTERS = frozenset("*?[")
# Decoding is Pillow (releases the GIL) plus a small TF resize: a few threads keep the model fed on 2+ cores.
_READ_WORKERS = max(1, min(4, os.cpu_count() or 1))


def run_resize_mode(run: Run | None) -> str | None:
    """data.resize_mode from a run's config.yaml, or None when there is no run config."""
    if run is None or not run.config_path.is_file():
        return None
    return run.setting("data", "resize_mode") or "stretch"


def run_decoding_with(run: Run | None, dicom_window: str | None, dicom_frames: str | None):
    """The run's `data.Decoding` (defaults without a run), with the settings given on the command line replacing it.

    Raises:
        UserError: a window or frames value that is not accepted.
    """
    from classifier import data

    decoding = data.run_decoding(run)
    changes = {"dicom_window": dicom_window, "dicom_frames": dicom_frames}
    return dataclasses.replace(decoding, **{key: value for key, value in changes.items() if value is not None})


def open_model(path: str | os.PathLike, threads: int | None = None):
    """Loads any model kind through `classifier.inference`, with `threads` CPU threads.

    LiteRT takes the thread count per model; TensorFlow (Keras and SavedModel files) only per process, and only
    before it has run anything, so in a process that already used TensorFlow the setting is left as it is.

    Returns:
        An `inference.Predictor`.

    Raises:
        UserError: see `inference.load_predictor`; also threads < 1.
    """
    from classifier import inference

    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: give 1 or more CPU threads")
    path = Path(path)
    if threads is not None and path.suffix != ".tflite":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            print(f"note: TensorFlow is already running; --threads {threads} does not apply to it", file=sys.stderr)
    return inference.load_predictor(path, num_threads=threads)


def collect_inputs(inputs: Sequence[str]) -> tuple[list[str], list[dict]]:
    """Expands files, folders and glob patterns into a list of image files.

    Folders are searched recursively for image files (`data.is_image_file`: an image suffix, or DICOM; hidden files
    and folders skipped); a file named explicitly is used whatever its suffix. Order: as given, folders and globs
    sorted.

    Args:
        inputs: Paths or glob patterns.

    Returns:
        (files, problems): files without duplicates, and {"path", "error"} for inputs that match nothing.
    """
    from classifier.data import is_image_file

    files: list[str] = []
    problems: list[dict] = []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for folder, subfolders, names in os.walk(item):
                subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
                found += [
                    os.path.join(folder, name) for name in sorted(names) if is_image_file(os.path.join(folder, name))
                ]
            if not found:
                problems.append({"path": item, "error": "folder holds no image files"})
            files += found
        elif os.path.exists(item):
            files.append(item)
        elif _GLOB_CHARACTERS & set(item):
            matches = sorted(path for path in glob.glob(item, recursive=True) if os.path.isfile(path))
            if not matches:
                problems.append({"path": item, "error": "pattern matches no file"})
            files += matches
        else:
            problems.append({"path": item, "error": "no such file or folder"})
    unique = list(dict.fromkeys(files))
    return unique, problems


def _read(path: str, image_size: int, resize_mode: str, decoding) -> tuple[np.ndarray | None, str | None]:
    """One file as model pixels, or the reason it cannot be read."""
    from classifier.data import load_and_resize, split_frame_ref

    try:
        if os.path.getsize(split_frame_ref(path)[0]) == 0:
            return None, "empty file (0 bytes)"
        return load_and_resize(path, image_size, resize_mode, decoding), None
    except Exception as error:  # Pillow raises many types: any unreadable file is reported and skipped, not fatal
        return None, f"cannot read image: {type(error).__name__}: {error}"


def predict_files(
    predictor,
    paths: Sequence[str],
    *,
    resize_mode: str = "stretch",
    batch_size: int = 32,
    description: str = "predicting",
    on_error: Callable[[str, str], None] | None = None,
    decoding=None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Runs a model on image files in batches, as training reads them.

    Args:
        predictor: An `inference.Predictor`.
        paths: Image files (or frames of DICOM files, `data.frame_ref`).
        resize_mode: "stretch" or "crop", as the model was trained.
        batch_size: Images per model call (and per read batch).
        description: Label of the progress bar (shown on stderr when it is a terminal).
        on_error: Called with (path, reason) for every unreadable file as it is found.
        decoding: A `data.Decoding` (DICOM window), as the model was trained; None takes the defaults.

    Returns:
        (probabilities float32 [N, C] with NaN rows for unreadable files, {index: reason} of those files).

    Raises:
        UserError: batch_size < 1.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give 1 or more images per batch")
    probabilities = np.full((len(paths), predictor.num_classes), np.nan, np.float32)
    errors: dict[int, str] = {}
    progress = tqdm(total=len(paths), desc=description, unit="img", file=sys.stderr, disable=not sys.stderr.isatty())
    with ThreadPoolExecutor(_READ_WORKERS) as pool, progress:
        for start in range(0, len(paths), batch_size):
            chunk = list(range(start, min(start + batch_size, len(paths))))
            results = pool.map(lambda i: _read(paths[i], predictor.image_size, resize_mode, decoding), chunk)
            good, images = [], []
            for index, (image, error) in zip(chunk, results, strict=True):
                if error is None:
                    good.append(index)
                    images.append(image)
                else:
                    errors[index] = error
                    if on_error is not None:
                        on_error(paths[index], error)
            if images:
                probabilities[good] = predictor.predict(np.stack(images), batch_size=batch_size)
            progress.update(len(chunk))
    return probabilities, errors


def class_labels(predictor) -> list[str]:
    """The predictor's class names, or class_0, class_1, ... (with a note) when none were found beside the model."""
    if predictor.labels:
        return list(predictor.labels)
    print(
        f"note: no labels found for {predictor.path} (put the run's {LABELS_FILE} beside it); showing class indices",
        file=sys.stderr,
    )
    return [f"class_{index}" for index in range(predictor.num_classes)]


def decision_rule(
    predictor, labels: list[str], threshold: float | None = None, use_operating_point: bool = True
) -> dict | None:
    """The threshold rule for a two-class model: from --threshold, else the stored operating point; else None.

    Returns:
        None (most probable class) or {"threshold", "positive_class", "positive_index", "source"}.

    Raises:
        UserError: --threshold given for a model with more than two classes, or outside [0, 1].
    """
    from classifier import operating_point

    if threshold is not None:
        if len(labels) != 2:
            raise UserError(f"--threshold applies to two-class models; this one has {len(labels)} classes")
        if not 0 <= threshold <= 1:
            raise UserError(f"--threshold {threshold} is not a probability: give a value in [0, 1]")
        return {"threshold": threshold, "positive_class": labels[1], "positive_index": 1, "source": "--threshold"}
    if not use_operating_point or len(labels) != 2:
        return None
    point = operating_point.find_operating_point(predictor.path)
    if point is None:
        return None
    if list(point["class_names"]) != labels:
        print(
            f"note: ignoring {point['path']}: it is for classes {point['class_names']}, the model has {labels}",
            file=sys.stderr,
        )
        return None
    return {
        "threshold": point["threshold"],
        "positive_class": point["positive_class"],
        "positive_index": point["positive_index"],
        "source": point["path"],
    }


def decision_function(rule: dict | None) -> Callable[[np.ndarray], np.ndarray]:
    """Probabilities [N, C] -> the class indices `prediction_rows` reports as `label` under `rule`."""
    if rule is None:
        return lambda probabilities: np.asarray(probabilities).argmax(axis=-1)
    positive, threshold = rule["positive_index"], rule["threshold"]
    return lambda probabilities: np.where(np.asarray(probabilities)[:, positive] >= threshold, positive, 1 - positive)


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
            "stretch".
        threshold: Two-class models: call the positive (second) class at probability >= this.
        use_operating_point: Two-class models: use the stored operating point when there is one.
        dicom_window: As `data.dicom_window`; default the run's setting, else "auto".
        dicom_frames: As `data.dicom_frames` ("first" or "all"); default the run's setting, else "first".
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
    if not inputs:
        raise UserError("no input images: pass image files, folders or glob patterns after the options")
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: give 1 or more")
    if explain_dir is not None:  # refused before any work
        from classifier import gradcam

        gradcam.refuse_unexplainable(model)
        gradcam.prepare_output_dir(explain_dir)
    files, problems = collect_inputs(inputs)
    for problem in problems:
        print(f"skipped {problem['path']}: {problem['error']}", file=sys.stderr)
    if not files:
        raise UserError(
            f"no image files found in {', '.join(map(repr, inputs))}: pass existing files, folders holding "
            "images, or quoted glob patterns such as 'scans/**/*.png'"
        )
    from classifier import data

    run = Run.of_model(model)
    decoding = run_decoding_with(run, dicom_window, dicom_frames)
    files = [ref for path in files for ref in data.frame_refs(path, decoding)]
    predictor = open_model(model, threads)
    labels = class_labels(predictor)
    rule = decision_rule(predictor, labels, threshold, use_operating_point)
    resize_mode = resize_mode or run_resize_mode(run) or "stretch"
    probabilities, errors = predict_files(
        predictor,
        files,
        resize_mode=resize_mode,
        batch_size=batch_size,
        on_error=lambda path, reason: print(f"skipped {path}: {reason}", file=sys.stderr),
        decoding=decoding,
    )
    top_k = min(top_k, len(labels))
    rows = prediction_rows(files, probabilities, errors, labels, top_k, rule)
    explained = None
    if explain_dir is not None:
        readable = [row for row in rows if row["error"] is None]
        explained = gradcam.explain_files(
            predictor.model,
            [row["path"] for row in readable],
            explain_dir,
            labels,
            classes=[labels.index(row["label"]) for row in readable],
            decide=decision_function(rule),
            resize_mode=resize_mode,
            decoding=decoding,
            batch_size=min(batch_size, 16),
        )
        explained = {key: explained[key] for key in ("output_dir", "contact_sheets", "summary")}
    rows += [{"path": p["path"], "label": None, "top_k": [], "error": p["error"]} for p in problems]
    return {
        "model": str(model),
        "kind": predictor.kind,
        "labels": labels,
        "image_size": predictor.image_size,
        "resize_mode": resize_mode,
        "decoding": dataclasses.asdict(decoding),
        "decision": rule,
        "top_k": top_k,
        "count": len(rows),
        "errors": len(errors) + len(problems),
        "predictions": rows,
        "explain": explained,
    }


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


def add_dicom_arguments(parser: argparse.ArgumentParser) -> None:
    """--dicom-window and --dicom-frames, shared by predict and evaluate."""
    parser.add_argument(
        "--dicom-window",
        default=None,
        metavar="WINDOW",
        help="DICOM window: auto, lung, mediastinum, bone, brain or C,W, with = before a negative centre "
        "(--dicom-window=-600,1500); default: the run's data.dicom_window",
    )
    parser.add_argument(
        "--dicom-frames",
        choices=("first", "all"),
        default=None,
        help="multi-frame DICOM: first frame, or every frame (default: the run's data.dicom_frames)",
    )


def _check_output(output: Path) -> None:
    """Makes sure `--output` can be written (creating its folder), or says why not, before any work is done."""
    if output.is_dir():
        raise UserError(
            f"--output '{output}' is a folder: give a file name inside it, e.g. '{output / 'predictions.csv'}'"
        )
    for parent in [output.parent, *output.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--output '{output}': '{parent}' is a file, not a folder; choose another path")
    output.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(output.parent, os.W_OK):
        raise UserError(f"--output '{output}': the folder '{output.parent}' is not writable; choose another path")


def main(argv: list[str] | None = None) -> int:
    """`classifier predict`: exit 0 when at least one image was classified, 1 when none could be read."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        fmt = args.format or ("json" if args.output and args.output.lower().endswith(".json") else "csv")
        if args.output:
            _check_output(Path(args.output))  # before the predictions, which a bad path would otherwise lose
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
            print(f"wrote Grad-CAM overlays and {sheets} to {result['explain']['output_dir']}", file=sys.stderr)
        if fmt == "json":
            text = json.dumps(result, indent=2) + "\n"
        else:
            text = to_csv(result["predictions"], result["top_k"], result["decision"])
        if args.output:
            output = Path(args.output)
            temporary = output.with_name(f".{output.name}.partial")
            temporary.write_text(text)
            os.replace(temporary, output)
            done = result["count"] - result["errors"]
            print(f"wrote {done} prediction(s) and {result['errors']} error(s) to {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0 if result["count"] > result["errors"] else 1

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
