"""Grad-CAM: where in an image the evidence for a class was found, as a heatmap over the image.

Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) takes the last convolutional feature map A
(h x w positions, K channels) — here the one the classifier pools, which every registry backbone ends in — and
the logit y_c of the class c being explained. Each channel is weighted by how much y_c grows with it,
a_k = mean over positions of dy_c/dA_k, and the map is ReLU(sum_k a_k A_k): the positions whose features speak for
c. It is scaled to [0, 1] by its largest value and resized bilinearly to the image.

What a heatmap is: the coarse places (the feature map is 1/32 of the input: 7 x 7 at 224 px) whose features raised
the score of that class. What it is not: a segmentation (its resolution is far too coarse and it marks evidence,
not object outlines), nor proof of a reason (it shows where, not why; a model that learned a ruler, a text marker
or the border of a scan will light those up, which is exactly what it is good for finding).

Works on the Keras model only (model.keras): the gradients need the graph, which a TFLite file or a SavedModel no
longer carries in usable form. The preprocessing is inside the model, so the heatmap is over the raw pixels.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classifier import atomic
from classifier.errors import UserError
from classifier.run import MODEL_FILE, Run

if TYPE_CHECKING:
    from classifier.data import Decoding

COLORMAP = "jet"  # the convention of Grad-CAM figures: red = strongest evidence, blue = none
OVERLAY_ALPHA = 0.6  # opacity of the colour where the heatmap is 1; the image shows through where it is 0
DISPLAY_SIZE = 256  # smallest side of a written overlay: a 48 px model input is unreadable at its own size
SHEET_PAGE = 64  # images per contact sheet page
SHEET_HEADING = "Grad-CAM: where the evidence for the class named under each image was (red strongest)"
SUMMARY_FILE = "gradcam.csv"
TENSORBOARD_IMAGES = 16  # validation images in the Grad-CAM grid written at the end of training


def refuse_unexplainable(model_path: str | os.PathLike) -> None:
    """Raises a one-line UserError for model files Grad-CAM cannot use (.tflite, SavedModel folders).

    Names the run's model.keras when the run folder beside or above the file has one.
    """
    path = Path(model_path)
    if path.suffix == ".tflite":
        kind = "a TFLite file"
    elif path.is_dir() and (path / "saved_model.pb").is_file():
        kind = "a SavedModel"
    else:
        return
    hint = f"pass the {MODEL_FILE} of the run that made it"
    for run in Run.beside_model(path):
        if run.model_path.is_file():
            hint = f"explain its run's Keras model instead: --model {run.model_path}"
            break
    raise UserError(
        f"'{path}' is {kind}: TFLite and SavedModel files cannot be explained (Grad-CAM needs the gradients of the "
        f"Keras model, which these files do not carry); {hint}"
    )


def prepare_output_dir(output: str | os.PathLike) -> Path:
    """Creates the folder heatmaps go to; a UserError when it is a file, lies below one, or cannot be written."""
    return atomic.writable_folder(output, "heatmap folder")


def _feature_map(model):
    """The last convolutional feature map of a classifier: the rank-4 tensor its pooling (or flatten) layer reads.

    Searched among the model's top-level layers, so a nested backbone (the toolkit's "backbone" layer) counts as
    one layer whose output is that map; it must be smaller than the input (a real feature map, not the image).
    """
    size = model.input_shape[1:3]
    found = None
    for layer in model.layers:
        try:
            inputs, outputs = layer.input, layer.output
        except (AttributeError, ValueError):  # several inputs or calls: not the pooling point of a plain classifier
            continue
        if isinstance(inputs, list) or len(getattr(inputs, "shape", ())) != 4 or len(outputs.shape) == 4:
            continue
        spatial = tuple(inputs.shape[1:3])
        if None not in spatial and None not in size and spatial[0] < size[0] and spatial[1] < size[1]:
            found = inputs
    if found is None:
        raise UserError(
            f"model '{model.name}' has no convolutional feature map that a layer pools: Grad-CAM needs a CNN "
            "classifier such as the ones this toolkit trains"
        )
    return found


def _logits(model):
    """The pre-softmax scores: the toolkit's "head" layer (before its temperature), else None (use log p)."""
    import keras

    from classifier.model import LOGITS_LAYER

    try:
        head = model.get_layer(LOGITS_LAYER)
    except ValueError:
        return None
    return head.output if getattr(head, "activation", None) is keras.activations.linear else None


class GradCam:
    """Grad-CAM heatmaps of one Keras classifier.

    Attributes:
        image_size: The model's square input size S.
        feature_map_shape: (h, w, K) of the feature map the heatmaps come from.
    """

    def __init__(self, model, traced: bool = True):
        """Prepares the heatmaps of `model`.

        Args:
            model: A Keras classifier that pools a convolutional feature map (any model `build_classifier` makes).
            traced: Run as one traced graph (faster from the second batch on: EfficientNet-Lite0, 224 px, 16
                images: 0.5 s a batch against 3.5 s eager; the first, which traces, 2.9 s). False for one batch
                of small images, where tracing costs more than it saves (the grid at the end of training).

        Raises:
            UserError: the model pools no convolutional feature map.
        """
        import keras
        import tensorflow as tf

        feature_map = _feature_map(model)
        logits = _logits(model)
        uses_logits = logits is not None
        gradcam_model = keras.Model(model.input, [feature_map, logits if uses_logits else model.output, model.output])
        self.image_size = int(model.input_shape[1])
        self.feature_map_shape = tuple(int(d) for d in feature_map.shape[1:])

        def step(images, classes):
            with tf.GradientTape() as tape:
                tape.watch(images)  # records every op, also when all layers are frozen (no trainable variable)
                features, scores, probabilities = gradcam_model(images, training=False)
                scores = tf.cast(scores, tf.float32)
                if not uses_logits:
                    scores = tf.math.log(tf.maximum(scores, 1e-30))  # log p: the logits up to a constant
                # Centred: a softmax ignores what all logits share, and so must the map (see the module docstring).
                scores -= tf.reduce_mean(scores, axis=-1, keepdims=True)
                classes = tf.where(classes < 0, tf.argmax(probabilities, axis=-1), classes)  # -1: the top class
                target = tf.reduce_sum(tf.gather(scores, classes, axis=1, batch_dims=1))
            gradients = tape.gradient(target, features)
            return tf.cast(features, tf.float32), tf.cast(gradients, tf.float32), probabilities, classes

        self._step = tf.function(step, reduce_retracing=True) if traced else step

    def heatmaps(
        self,
        images: np.ndarray,
        classes: Sequence[int | None] | None = None,
        decide: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Heatmaps of a batch of images.

        Args:
            images: float32 or uint8 [N, S, S, 3] raw pixels 0..255.
            classes: The class to explain for each image (None for an image explains its predicted class); None
                explains every image's predicted class.
            decide: Maps probabilities [N, C] to the predicted classes (a threshold rule); default argmax.

        Returns:
            (heatmaps float32 [N, S, S] in [0, 1] (all 0 where no position speaks for the class), probabilities
            float32 [N, C], explained classes int [N], predicted classes int [N]).
        """
        import tensorflow as tf

        images = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
        wanted = [None] * len(images) if classes is None else list(classes)
        wanted = np.array([-1 if c is None else int(c) for c in wanted], dtype=np.int64)
        features, gradients, probabilities, used = (t.numpy() for t in self._step(images, tf.constant(wanted)))
        predicted = np.asarray((decide or _argmax)(probabilities), dtype=np.int64)
        explained = np.where(wanted < 0, predicted, wanted)
        redo = np.flatnonzero(explained != used)  # a threshold rule decided other than argmax: explain its class
        if len(redo):
            again = self._step(tf.gather(images, redo), tf.constant(explained[redo]))
            features[redo], gradients[redo] = again[0].numpy(), again[1].numpy()
        weights = gradients.mean(axis=(1, 2))  # a_k: one weight per channel and image
        cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", features, weights))
        cam = tf.image.resize(cam[..., None], (self.image_size, self.image_size), method="bilinear")[..., 0]
        cam = tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True))
        return cam.numpy(), probabilities.astype(np.float32), explained, predicted


def _argmax(probabilities: np.ndarray) -> np.ndarray:
    return probabilities.argmax(axis=-1)


def pick_examples(labels: np.ndarray, decisions: np.ndarray, count: int = TENSORBOARD_IMAGES) -> list[int]:
    """Indices of up to `count` images to show: wrong ones (up to half, spread over the set) first, then right ones.

    Both kinds are shown because a heatmap on a mistake says where the model was misled, and one on a right
    answer whether it was right for a plausible reason.
    """
    labels, decisions = np.asarray(labels), np.asarray(decisions)
    wrong = np.flatnonzero(labels != decisions)
    right = np.flatnonzero(labels == decisions)

    def spread(indices: np.ndarray, k: int) -> list[int]:
        if k >= len(indices):
            return [int(i) for i in indices]
        return [int(indices[i]) for i in np.linspace(0, len(indices) - 1, k).round().astype(int)]

    shown_wrong = spread(wrong, min(len(wrong), max(count // 2, count - len(right))))
    return shown_wrong + spread(right, min(len(right), count - len(shown_wrong)))


def overlay(image: np.ndarray, heatmap: np.ndarray, size: int | None = None) -> np.ndarray:
    """The heatmap in colour over the image: opaque where it is 1, the image alone where it is 0.

    Args:
        image: uint8 [H, W, 3].
        heatmap: float [h, w] in [0, 1]; resized bilinearly to the image.
        size: Resize the image (and map) to this square size first; None keeps the image's size.

    Returns:
        uint8 [H, W, 3] (or [size, size, 3]).
    """
    import matplotlib
    from PIL import Image

    if size is not None and image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.BILINEAR))
    height, width = image.shape[:2]
    heat = Image.fromarray(np.asarray(heatmap, np.float32), mode="F").resize((width, height), Image.BILINEAR)
    heat = np.clip(np.asarray(heat), 0.0, 1.0)[..., None]
    colour = matplotlib.colormaps[COLORMAP](heat[..., 0])[..., :3] * 255.0
    alpha = OVERLAY_ALPHA * heat
    return np.clip(np.rint(image * (1 - alpha) + colour * alpha), 0, 255).astype(np.uint8)


def side_by_side(image: np.ndarray, overlaid: np.ndarray, gap: int = 4) -> np.ndarray:
    """[image | gap | overlay] as one uint8 picture, so the anatomy or part is seen unobscured beside the map."""
    from PIL import Image

    if image.shape != overlaid.shape:
        size = (overlaid.shape[1], overlaid.shape[0])
        image = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize(size, Image.BILINEAR))
    spacer = np.full((overlaid.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([image, spacer, overlaid], axis=1)


def contact_sheet(pictures: list[np.ndarray], titles: list[str], path: Path, heading: str) -> Path:
    """A grid of pictures with titles, as one PNG."""
    from classifier.plots import image_figure, save_figure

    return save_figure(image_figure(pictures, titles, columns=min(6, len(pictures)), heading=heading), path)


def sheet_path(output_dir: Path, page: int, numbered: bool) -> Path:
    """`contact_sheet.png`, or `contact_sheet_01.png`... when the images fill more than one page."""
    return output_dir / (f"contact_sheet_{page + 1:02d}.png" if numbered else "contact_sheet.png")


def _overlay_name(path: str, taken: set[str]) -> str:
    """`<stem>.gradcam.png`; `<folder>_<stem>.gradcam.png` when another input has that stem; then numbered."""
    from classifier.data import split_frame_ref

    file, frame = split_frame_ref(path)
    stem = Path(file).stem + (f"_frame{frame}" if frame is not None else "")
    candidates = [stem, f"{Path(file).parent.name}_{stem}"]
    candidates += [f"{candidates[1]}-{number}" for number in range(2, len(taken) + 3)]
    return next(f"{name}.gradcam.png" for name in candidates if f"{name}.gradcam.png" not in taken)


@dataclasses.dataclass
class _ContactSheets:
    """Contact sheet pages, each written once it is full (or at the end).

    Attributes:
        output_dir: Folder the pages go into.
        written: The pages written so far.
        page: (overlay, title) of the images on the page being filled.
    """

    output_dir: Path
    written: list[Path] = dataclasses.field(default_factory=list)
    page: list[tuple[np.ndarray, str]] = dataclasses.field(default_factory=list)

    def add(self, picture: np.ndarray, title: str) -> None:
        """Puts an overlay on the current page, writing the page first when it is full."""
        if len(self.page) == SHEET_PAGE:  # a full page and one more image: there will be several pages
            self.flush(numbered=True)
        self.page.append((picture, title))

    def flush(self, numbered: bool) -> None:
        """Writes the current page, if it has any image."""
        if self.page:
            target = sheet_path(self.output_dir, len(self.written), numbered)
            pictures, titles = [p for p, _ in self.page], [t for _, t in self.page]
            self.written.append(contact_sheet(pictures, titles, target, SHEET_HEADING))
            self.page.clear()


@dataclasses.dataclass
class _Explaining:
    """What the steps of `explain_files` share: the model, how images are read and named, and what was written.

    Attributes:
        cam: The Grad-CAM of the model.
        labels: Class names in output order.
        output_dir: Folder written into.
        resize_mode: As the model was trained.
        decoding: A `data.Decoding`, or None for the defaults.
        decide: Maps probabilities to the predicted classes; None for argmax.
        on_error: Called with (path, reason) for every unreadable file, or None.
        sheets: The contact sheets.
        rows: One summary row per image handled so far, in the order handled.
        used_names: Overlay file names taken so far.
    """

    cam: GradCam
    labels: list[str]
    output_dir: Path
    resize_mode: str
    decoding: Decoding | None
    decide: Callable[[np.ndarray], np.ndarray] | None
    on_error: Callable[[str, str], None] | None
    sheets: _ContactSheets
    rows: list[dict] = dataclasses.field(default_factory=list)
    used_names: set[str] = dataclasses.field(default_factory=set)

    @property
    def display(self) -> int:
        """Side of the written overlays: the model's input size, at least `DISPLAY_SIZE`."""
        return max(self.cam.image_size, DISPLAY_SIZE)


def explain_files(
    model,
    paths: Sequence[str],
    output_dir: str | os.PathLike,
    labels: list[str],
    *,
    classes: Sequence[int | None] | int | None = None,
    decide: Callable[[np.ndarray], np.ndarray] | None = None,
    resize_mode: str = "stretch",
    decoding=None,
    batch_size: int = 16,
    on_error: Callable[[str, str], None] | None = None,
) -> dict:
    """Writes a Grad-CAM overlay per image file and contact sheets of all of them.

    Args:
        model: The Keras classifier.
        paths: Image files (or frames of DICOM files, `data.frame_ref`).
        output_dir: Folder to write into (created).
        labels: Class names in output order.
        classes: The class to explain: one index for every image, one per image (None = its prediction), or None
            (every image's prediction).
        decide: Maps probabilities [N, C] to the predicted classes; default argmax.
        resize_mode: As the model was trained ("stretch" or "crop"); the overlay shows the image as the model saw
            it (cropped in crop mode), at `DISPLAY_SIZE` px or more.
        decoding: A `data.Decoding` (DICOM window), as the model was trained; None takes the defaults.
        batch_size: Images per gradient computation.
        on_error: Called with (path, reason) for every unreadable file.

    Returns:
        {"output_dir", "contact_sheets": [paths], "summary": path of gradcam.csv, "rows": [{path, overlay,
        explained, predicted, probability (of the explained class), predicted_probability, error}]}.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    explaining = _Explaining(
        GradCam(model), labels, output_dir, resize_mode, decoding, decide, on_error, _ContactSheets(output_dir)
    )
    one_for_all = classes is None or isinstance(classes, int | np.integer)
    per_image = [classes] * len(paths) if one_for_all else list(classes)
    assert len(per_image) == len(paths), "one class (or None) per image"
    for start in range(0, len(paths), batch_size):
        batch = range(start, min(start + batch_size, len(paths)))
        good, model_view, display_view = _read_images(explaining, paths, batch)
        if good:
            _explain_batch(explaining, [paths[i] for i in good], [per_image[i] for i in good], model_view, display_view)
    sheets = explaining.sheets
    sheets.flush(numbered=bool(sheets.written))
    order = {path: i for i, path in enumerate(paths)}
    rows = sorted(explaining.rows, key=lambda row: order[row["path"]])
    _write_summary(output_dir / SUMMARY_FILE, rows)
    return {
        "output_dir": str(output_dir),
        "contact_sheets": [str(path) for path in sheets.written],
        "summary": str(output_dir / SUMMARY_FILE),
        "rows": rows,
    }


def _read_images(
    explaining: _Explaining, paths: Sequence[str], indices: range
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """(readable indices, their pixels at the model's size, at the display size); an unreadable file gets a row."""
    from classifier import data

    good, model_view, display_view = [], [], []
    for index in indices:
        try:
            pixels = data.load_image(paths[index], explaining.decoding)
            model_view.append(data.resize_image(pixels, explaining.cam.image_size, explaining.resize_mode).numpy())
            display_view.append(data.resize_image(pixels, explaining.display, explaining.resize_mode).numpy())
            good.append(index)
        except Exception as error:  # Pillow and pydicom raise many types: reported per file, never fatal
            reason = f"cannot read image: {type(error).__name__}: {error}"
            explaining.rows.append({"path": paths[index], "overlay": None, "error": reason})
            if explaining.on_error is not None:
                explaining.on_error(paths[index], reason)
    return good, model_view, display_view


def _explain_batch(
    explaining: _Explaining,
    paths: list[str],
    wanted: list[int | None],
    model_view: list[np.ndarray],
    display_view: list[np.ndarray],
) -> None:
    """Writes the overlay of each image of a batch, adds it to the contact sheets and its row to the summary."""
    from PIL import Image

    from classifier import atomic

    labels = explaining.labels
    maps, probabilities, explained, predicted = explaining.cam.heatmaps(np.stack(model_view), wanted, explaining.decide)
    for j, path in enumerate(paths):
        candidate = _overlay_name(path, explaining.used_names)
        explaining.used_names.add(candidate)
        overlaid = overlay(display_view[j], maps[j])
        picture = side_by_side(display_view[j], overlaid)
        with atomic.replacing(explaining.output_dir / candidate) as temporary:
            Image.fromarray(picture).save(temporary, format="PNG")
        c, p = int(explained[j]), int(predicted[j])
        row = {
            "path": path,
            "overlay": candidate,
            "explained": labels[c],
            "predicted": labels[p],
            "probability": float(probabilities[j, c]),
            "predicted_probability": float(probabilities[j, p]),
            "error": None,
        }
        explaining.rows.append(row)
        title = f"{candidate.removesuffix('.gradcam.png')[:28]}\n{labels[c]} {row['probability']:.2f}"
        if c != p:
            title += f" (predicted {labels[p]})"
        explaining.sheets.add(overlaid, title)


def _write_summary(path: Path, rows: list[dict]) -> None:
    """Writes gradcam.csv: one row per image, in the order given."""
    import csv

    from classifier import atomic

    columns = ["path", "overlay", "explained", "predicted", "probability", "predicted_probability", "error"]
    with atomic.replacing(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
