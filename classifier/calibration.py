"""Temperature scaling: probabilities that mean what they say, fitted once on the validation split.

A network trained to a low training loss is usually over-confident: of the images it calls "95 % defective", far
fewer than 95 % are. Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks",
https://arxiv.org/abs/1706.04599) divides the logits by one scalar T > 0 before the softmax, chosen to minimise the
negative log-likelihood (NLL) of the validation labels. T > 1 softens over-confident scores, T < 1 sharpens
timid ones (label smoothing makes those). Dividing every logit by the same positive number never changes which
class is largest, nor the order of the scores of a class across images: accuracy, ROC curves and AUC stay exactly
as they were; only the confidence changes.

Training fits T after the best weights are restored and bakes it into `model.keras` (the classifier's
"temperature" layer, `classifier.model.probabilities_from`), so evaluate, predict, the operating point and every
export (SavedModel, all TFLite files, hence MediaPipe on a phone) give calibrated probabilities. The fit is
recorded in `RUN/calibration.json` (copied into `export/` with the files) and in `metrics.json`.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from classifier import atomic
from classifier.errors import UserError
from classifier.run import MODEL_FILE, Run, find_beside_model, read_record

# The search range of T. Wide enough for a network whose logits are ten times too large (T near 10) and for the
# sharpening label smoothing calls for (T near 0.5); at the ends the probabilities are all 0/1 or all equal.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
# Keys every calibration.json has.
KEYS = ("method", "temperature", "subset", "count", "nll_before", "nll_after", "ece_before", "ece_after", "note")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, in float64, without overflow."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (cross-entropy, natural log) of `labels` under softmax(logits / temperature)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(axis=-1, keepdims=True)
    log_normaliser = (top + np.log(np.exp(scaled - top).sum(axis=-1, keepdims=True)))[:, 0]
    return float(np.mean(log_normaliser - scaled[np.arange(len(scaled)), np.asarray(labels)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, str | None]:
    """The temperature that minimises the NLL of `labels`, or 1.0 where fitting one would not help.

    The NLL is minimised over log T in [log MIN_TEMPERATURE, log MAX_TEMPERATURE] (scipy's bounded Brent search;
    the NLL is convex in 1/T, so the minimum is unique). T stays 1.0 when:
    - every image is classified right: the NLL then keeps falling as T goes to 0 (every score towards 1.0), so
      the data gives no finite temperature, and pushing every score to 1.0 would be over-confidence itself;
    - the fitted T does not lower the NLL (already calibrated).

    Args:
        logits: float [N, C], the pre-softmax outputs ("head" layer).
        labels: int [N].

    Returns:
        (temperature rounded to 4 significant digits, why it was kept at 1.0 or None).
    """
    from scipy.optimize import minimize_scalar

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        return 1.0, "no validation images: nothing to fit the temperature on"
    if np.all(logits.argmax(axis=-1) == labels):
        return 1.0, (
            f"all {len(labels)} validation images are classified right, so the likelihood has no finite best "
            "temperature; kept at 1"
        )
    result = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t)),
        bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    temperature = float(f"{math.exp(result.x):.4g}")
    if not nll(logits, labels, temperature) < nll(logits, labels) - 1e-6:
        return 1.0, "no temperature lowers the validation NLL (already calibrated); kept at 1"
    return temperature, None


def calibration_record(
    logits: np.ndarray, labels: np.ndarray, temperature: float, note: str | None = None, n_bins: int = 10
) -> dict:
    """What a temperature does on one subset: NLL and ECE before (T = 1) and after."""
    from classifier.metrics import expected_calibration_error

    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "method": "temperature_scaling",
        "temperature": float(temperature),
        "count": int(len(labels)),
        "nll_before": nll(logits, labels) if len(labels) else None,
        "nll_after": nll(logits, labels, temperature) if len(labels) else None,
        "ece_before": expected_calibration_error(labels, before, n_bins),
        "ece_after": expected_calibration_error(labels, after, n_bins),
        "ece_bins": n_bins,
        "note": note,
    }


def logits_model(model):
    """The classifier up to its logits (the "head" layer), sharing its layers.

    Raises:
        UserError: the model has no linear "head" layer (it was not built by this toolkit's `build_classifier`).
    """
    import keras

    from classifier.model import LOGITS_LAYER

    try:
        head = model.get_layer(LOGITS_LAYER)
    except ValueError:
        head = None
    if head is None or getattr(head, "activation", None) is not keras.activations.linear:
        raise UserError(
            f"model '{model.name}' has no logits layer '{LOGITS_LAYER}' (a Dense layer without activation): "
            f"temperature scaling needs a {MODEL_FILE} written by this toolkit's training (train it again)"
        )
    return keras.Model(model.input, head.output, name="logits")


def with_temperature(model, temperature: float):
    """The same classifier (the very same layers and weights) with its probabilities at `temperature`.

    Args:
        model: A classifier from `classifier.model.build_classifier` (or a model.keras it was saved to).
        temperature: T > 0; the output becomes softmax(logits / T).

    Returns:
        A new keras.Model named like `model`, whose "temperature" layer is a Rescaling by 1 / T.
    """
    import keras

    from classifier.model import probabilities_from

    assert temperature > 0, temperature
    logits = logits_model(model).output
    return keras.Model(model.input, probabilities_from(logits, temperature), name=model.name)


def model_temperature(model) -> float | None:
    """The temperature a classifier applies (1 / the "temperature" layer's scale), or None when it has none."""
    from classifier.model import TEMPERATURE_LAYER

    try:
        layer = model.get_layer(TEMPERATURE_LAYER)
    except ValueError:
        return None
    return float(f"{1.0 / float(layer.scale):.6g}")


def undo_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities a model gave before its temperature was applied: softmax(T * log p).

    Exact up to float rounding for float outputs (log p = logits / T minus a constant per image); for the uint8
    scores of an int8 model, where a small probability may read as exactly 0, it is the nearest thing.
    """
    log_p = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-30, None))
    return softmax(log_p, 1.0 / temperature)


def write_calibration(folder: str | os.PathLike, record: dict) -> Path:
    """Writes `record` (from `calibration_record`, plus subset and class_names) as `folder/calibration.json`."""
    missing = [key for key in KEYS if key not in record]
    assert not missing, f"calibration record lacks {missing}"
    path = Run(folder).calibration_path
    atomic.write_json(path, {**record, "created": datetime.now(UTC).isoformat(timespec="seconds")})
    return path


def read_calibration(path_or_dir: str | os.PathLike) -> dict | None:
    """Reads a calibration.json (or the one in a folder); None when there is none.

    Raises:
        UserError: the file exists but is not a valid calibration record.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = Run(path).calibration_path

    def convert(record: dict) -> None:
        record["temperature"] = float(record["temperature"])
        if not record["temperature"] > 0:
            raise ValueError(f"temperature {record['temperature']} is not positive")

    fix = "restore it from the run folder (export copies it), or delete it (evaluate then reports no calibration)"
    return read_record(path, KEYS, convert, "calibration record", fix)


def find_calibration(model_path: str | os.PathLike) -> dict | None:
    """The calibration record that belongs to a model file: beside it (export/) or in the run folder above it."""
    return find_beside_model(model_path, lambda run: read_calibration(run.calibration_path))
