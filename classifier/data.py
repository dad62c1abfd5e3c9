"""Folder of images -> validated files -> stratified split manifest -> tf.data pipelines.

Layouts (decided by `scan_folder`):
- one subfolder per class (`data/cats/*.jpg`, `data/dogs/*.png`; nested folders inside a class are searched too);
- pre-split: the top level holds `train/` and at least one of `val/` (also spelled `valid/` or `validation/`) and
  `test/`, each holding the same class folders. The given folders are used as given; a missing `val/` or `test/`
  is split off `train/` per class with the requested fraction, so every run still has all three subsets.

Every image file is opened and fully decoded once during the scan; empty, truncated and undecodable files are
listed in `split.json` under "skipped" with the reason and never stop a run. Hidden files and folders (names
starting with ".") and files whose suffix is not in `IMAGE_EXTENSIONS` or `dicom.EXTENSIONS` are ignored, except
DICOM files without a suffix (or with a numeric one, as PACS exports name them), which are known by their bytes.

Pixels: every file becomes 3-channel RGB uint8 through one function, `load_image`, which the scan, the training
pipeline, evaluate, predict and the int8 calibration of export all call, so a model is served the pixels it was
trained on. Alpha is dropped, not composited: the stored colour is kept, as `tf.io.decode_image(channels=3)` and
Keras' folder loaders do. 16-bit grayscale PNGs are scaled by 255/65535 (rounded); 16-bit RGB PNGs are reduced by
Pillow (high byte). 16-bit, 32-bit and float grayscale TIFFs (microscopes, inspection cameras) are scaled from the
image's own minimum..maximum to 0..255, so a 12-bit image is not left nearly black and nothing is clipped (a flat
image becomes black). EXIF orientation is applied, so images are used the way every viewer shows them. Animated
GIFs and multi-page TIFFs contribute their first frame. DICOM files are windowed as `classifier.dicom` describes
(`Decoding` holds the settings); with `dicom_frames: all` every frame of a multi-frame file is a sample of its own,
named `<file>#frame=N` (N from 1) in the split, and the frames of one file always stay in one subset.

Grouped splits (`group_by`): all images of one patient (DICOM PatientID) or of one file-name group stay in one
subset. Group keys are hashed (sha256, 16 hex digits) as soon as they are read; only the hashes reach `split.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from classifier import atomic, dicom
from classifier.config import parse_group_by
from classifier.errors import UserError
from classifier.run import SPLIT_FILE, Run

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)  # all read by the Pillow build this project pins (WebP and libtiff are compiled into its wheels)
RESIZE_MODES = ("stretch", "crop")
SUBSETS = ("train", "val", "test")
# Classes count as imbalanced when the largest training class has more than this many times the images of the
# smallest; below it, weighting changes little and only adds noise to the loss.
IMBALANCE_RATIO = 1.5
MIN_IMAGES_PER_CLASS = 2
# Folder names that mark the pre-split layout, and the subset each one stands for.
PRESPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Folders that archivers, file systems and NAS boxes add beside real classes: never a class.
IGNORED_FOLDERS = frozenset({"__MACOSX", "$RECYCLE.BIN", "System Volume Information", "@eaDir", "lost+found"})
# One image above this many pixels costs gigabytes once decoded (a 13,000 x 13,000 PNG of 493 KB: 2.4 GB), far
# more than any input size needs; such files are skipped with the reason. Pillow's own bomb limit (89 MP, a
# warning, then an error at twice that) is kept for files above it.
MAX_PIXELS = 8192 * 8192
_PROGRESS_MIN_FILES = 500  # smaller scans finish in a blink: a progress bar would only add noise
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
FRAME_CHOICES = ("first", "all")
_FRAME_REF = re.compile(r"^(.*)#frame=([1-9][0-9]*)$", re.DOTALL)
# Part of the disk-cache key: bump it whenever `load_image` gives other pixels for the same file and settings.
_DECODER_VERSION = 2  # 2: DICOM, TIFF scaled by its own range


@dataclass(frozen=True)
class Decoding:
    """The settings that decide how a file's pixels are read (`data.dicom_window`, `data.dicom_frames`).

    Every reader takes one, so the scan, training, evaluation, prediction and calibration read alike.

    Attributes:
        dicom_window: `auto`, a preset (`dicom.WINDOW_PRESETS`) or `C,W`; see `dicom.parse_window`.
        dicom_frames: `first` (a multi-frame DICOM file is one sample, its first frame) or `all` (each frame
            is a sample).
    """

    dicom_window: str = "auto"
    dicom_frames: str = "first"

    def __post_init__(self):
        dicom.parse_window(self.dicom_window)  # fails early, with the accepted values
        if self.dicom_frames not in FRAME_CHOICES:
            raise UserError(f"data.dicom_frames is {self.dicom_frames!r}: choose one of {', '.join(FRAME_CHOICES)}.")

    @property
    def window(self) -> tuple[float, float] | None:
        """(centre, width) of a configured window, or None for `auto`."""
        return dicom.parse_window(self.dicom_window)

    @property
    def cache_key(self) -> str:
        """What the pixels depend on besides the file, for cache names."""
        return f"decoder{_DECODER_VERSION}:window={self.dicom_window}"

    @classmethod
    def from_settings(cls, settings: Mapping) -> Decoding:
        """From a config's data section (a `DataConfig` or the `data:` mapping of a run's config.yaml)."""
        values = settings if isinstance(settings, Mapping) else dataclasses.asdict(settings)
        return cls(
            dicom_window=str(values.get("dicom_window") or "auto"),
            dicom_frames=str(values.get("dicom_frames") or "first"),
        )


def run_decoding(run: Run | None) -> Decoding:
    """The decoding settings a run trained with (its config.yaml), or the defaults when there is no run."""
    if run is None:
        return Decoding()
    return Decoding(
        dicom_window=str(run.setting("data", "dicom_window") or "auto"),
        dicom_frames=str(run.setting("data", "dicom_frames") or "first"),
    )


def frame_ref(path: str, frame: int) -> str:
    """The name of one frame (0-based `frame`) of a multi-frame file in splits and reports: `<path>#frame=N`, N
    from 1 as DICOM numbers frames."""
    return f"{path}#frame={frame + 1}"


def split_frame_ref(path: str) -> tuple[str, int | None]:
    """(file, 0-based frame or None) of a path that may be a `frame_ref`."""
    match = _FRAME_REF.match(path)
    return (match.group(1), int(match.group(2)) - 1) if match else (path, None)


def frame_refs(path: str, decoding: Decoding) -> list[str]:
    """The samples of one file: the file, or with `dicom_frames: all` a `frame_ref` per frame of a multi-frame DICOM
    file (a file that cannot be read stays whole, so that its reader reports why)."""
    if decoding.dicom_frames != "all" or not dicom.is_dicom(path):
        return [path]
    try:
        count = dicom.frame_count(path)
    except dicom.DicomError:
        return [path]
    return [frame_ref(path, frame) for frame in range(count)] if count > 1 else [path]


def group_hash(kind: str, key: str) -> str:
    """The only form in which a group key (a patient ID, a part of a file name) is kept or written."""
    return hashlib.sha256(f"{kind}\0{key}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Split:
    """The manifest of a run: which image is in which subset, with which label.

    Attributes:
        root: Absolute path of the data folder; the paths below are relative to it.
        class_names: Sorted class names; the index of a name is its label.
        train: (relative path, label) pairs of the training images, sorted by path.
        val: The validation images (model selection, early stopping).
        test: The test images (final metrics only); empty when the test fraction is 0.
        skipped: {"path": relative path, "reason": why it cannot be used} for every unreadable image file.
        seed: Seed of the split.
        fractions: {"val": 0.15, "test": 0.15}; for the pre-split layout {"presplit": True} plus the fraction of
            any subset that was split off `train/` because its folder was missing.
        group_by: The `data.group_by` setting the split was made with.
        groups: With a group_by: {subset: sorted hashes of the groups in it} (`group_hash`), so anyone can check
            that no group is in two subsets; empty without one.
    """

    root: str
    class_names: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    skipped: list[dict]
    seed: int
    fractions: dict
    group_by: str = "none"
    groups: dict[str, list[str]] = field(default_factory=dict)

    def subset(self, name: str) -> list[tuple[str, int]]:
        """The (relative path, label) pairs of subset `name` ("train", "val" or "test")."""
        if name not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {name!r}")
        return getattr(self, name)

    def to_json(self) -> dict:
        """The `split.json` content: lists instead of tuples, nothing else changed."""
        content = {"root": self.root, "class_names": self.class_names, "seed": self.seed, "fractions": self.fractions}
        for name in SUBSETS:
            content[name] = [[path, label] for path, label in self.subset(name)]
        content["skipped"] = self.skipped
        content["group_by"] = self.group_by
        if self.groups:
            content["groups"] = self.groups
        return content


@dataclass(frozen=True)
class ScanResult:
    """What `scan_folder` found.

    Attributes:
        root: Absolute path of the data folder.
        class_names: Sorted class names.
        images: Usable images per folder subset: {"all": [...]} for the class-folder layout, or the subsets
            present ({"train": [...], "val": [...], "test": [...]}) for the pre-split layout.
        skipped: {"path", "reason"} of every file that looked like an image but cannot be used.
        folders: For the pre-split layout, the folder name of each subset present ({"val": "validation", ...}).
        group_by: The `data.group_by` setting of the scan.
        groups: {relative file path: `group_hash`} of the files a group_by put in a group (a DICOM file without
            PatientID, or a path the pattern does not match, is in no group: it is a group of its own).
    """

    root: str
    class_names: list[str]
    images: dict[str, list[tuple[str, int]]]
    skipped: list[dict]
    folders: dict[str, str]
    group_by: str = "none"
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def presplit(self) -> bool:
        """True for the `train/ val/ test/` layout."""
        return "all" not in self.images


def load_image(path: str | os.PathLike | bytes, decoding: Decoding | None = None) -> np.ndarray:
    """Reads an image file as RGB pixels, whatever its format and mode: the one reader of every pipeline.

    Args:
        path: The image file, or one frame of a multi-frame DICOM file (`frame_ref`).
        decoding: DICOM window settings; None takes the defaults.

    Returns:
        uint8 array of shape (height, width, 3).

    Raises:
        OSError: the file is missing, empty, truncated or not an image (`PIL.UnidentifiedImageError` is one).
        ValueError: Pillow cannot convert the file's colour mode to RGB, or the file is too large;
            `dicom.DicomError` (a ValueError) for a DICOM file that cannot be used, with the reason.
    """
    path = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    path, frame = split_frame_ref(path)
    if dicom.is_dicom(path):
        window = (decoding or Decoding()).window
        return dicom.read(path, window=window, frame=frame or 0, max_pixels=MAX_PIXELS)
    if frame is not None:
        raise ValueError(f"'{path}' is not a DICOM file, so it has no frame {frame + 1}")
    with Image.open(path) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(
                f"too large: {image.width} x {image.height} pixels ({image.width * image.height / 1e6:.0f} MP) "
                f"is over the {MAX_PIXELS / 1e6:.0f} MP that is decoded; downscale the file"
            )
        image.load()  # the full decode: a truncated file fails here, not halfway through training
        tiff = image.format == "TIFF"
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image, own_range=tiff)


def _to_rgb(image: Image.Image, own_range: bool = False) -> np.ndarray:
    """Pillow image of any mode -> (H, W, 3) uint8; `own_range` scales deep grey from the image's min..max."""
    if own_range and (image.mode in _SIXTEEN_BIT_MODES or image.mode == "F"):
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        scaled = np.zeros_like(values)  # a flat image is black
        if high > low:
            scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / (high - low))
        gray = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own convert() clips 16-bit values at 255 (a white image for most X-rays): scale instead.
        gray = np.rint(np.asarray(image, dtype=np.float64) * (255.0 / 65535.0))
        return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode != "RGB":
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA": alpha is
            # dropped on purpose (module docstring), so the advice does not apply.
            warnings.simplefilter("ignore", UserWarning)
            image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


@dataclass(frozen=True)
class _Checked:
    """What the scan learns from reading one file: why it cannot be used, or its frames and patient ID."""

    reason: str | None
    frames: int = 1
    patient_id: str | None = None


def check_image(path: str | os.PathLike, decoding: Decoding | None = None) -> str | None:
    """Validates one file the way training will read it.

    Args:
        path: The file.
        decoding: As in `load_image`.

    Returns:
        None when `load_image` reads it, else the reason it cannot be used, e.g. "empty file (0 bytes)",
        "not an image: cannot identify image file" or "truncated or corrupt image: <Pillow's message>".
    """
    return _check(path, decoding or Decoding()).reason


def _check(path: str | os.PathLike, decoding: Decoding) -> _Checked:
    """`check_image`, plus the frame count and patient ID of a DICOM file."""
    try:
        if os.path.getsize(path) == 0:
            return _Checked("empty file (0 bytes)")
        if dicom.is_dicom(path):
            info = dicom.inspect(
                path, window=decoding.window, all_frames=decoding.dicom_frames == "all", max_pixels=MAX_PIXELS
            )
            return _Checked(None, info.frames, info.patient_id)
        load_image(path, decoding)
    except dicom.DicomError as error:
        return _Checked(str(error))
    except UnidentifiedImageError:
        return _Checked("not an image: cannot identify image file")
    except Image.DecompressionBombError as error:
        return _Checked(f"too large to decode safely: {error}")
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # Pillow's plugins raise all of these
        if str(error).startswith("too large:"):
            return _Checked(str(error))
        return _Checked(f"truncated or corrupt image: {error}")
    return _Checked(None)


def scan_folder(data_dir: str | os.PathLike, decoding: Decoding | None = None, group_by: str = "none") -> ScanResult:
    """Finds the classes and validates every image file of a data folder.

    Args:
        data_dir: Folder with one subfolder per class, or with `train/` plus `val/` and/or `test/`.
        decoding: How files are read (DICOM window and frames); None takes the defaults.
        group_by: `none`, `dicom_patient` or `filename_regex:PATTERN` (`config.parse_group_by`).

    Returns:
        The classes, the usable images (with `dicom_frames: all`, one `frame_ref` per frame of a multi-frame
        file) and the skipped files with reasons; with a group_by, the hashed group of each grouped file.

    Raises:
        UserError: the folder is missing or empty, has a single class, a class has fewer than
            `MIN_IMAGES_PER_CLASS` usable images, or a group_by pattern matches no file.
    """
    decoding = decoding or Decoding()
    group_kind, pattern = parse_group_by(group_by)
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(data_dir))))
    if not root.exists():
        raise UserError(
            f"data folder '{root}' does not exist: pass --data-dir pointing at a folder with one subfolder per class"
        )
    if not root.is_dir():
        raise UserError(
            f"--data-dir '{root}' is a file, not a folder: pass the folder that holds one subfolder per class"
            + (" (unpack the archive first)" if root.suffix.lower() in (".zip", ".tar", ".gz", ".tgz") else "")
        )
    if not root.is_dir():
        raise UserError(f"data folder '{root}' is a file, not a folder: pass --data-dir with one subfolder per class")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some libraries switch this on globally; it would let half-written JPEGs through as grey-padded images.
        ImageFile.LOAD_TRUNCATED_IMAGES = False

    folders = _visible_subfolders(root)
    presplit = _is_presplit(root, folders)
    extra = sorted(set(folders) - set(PRESPLIT_FOLDERS))
    if not presplit and extra != folders and "train" in folders and _visible_subfolders(root / "train"):
        # train/ + val/ beside other folders: neither layout fits, and guessing would make "train" a class.
        raise UserError(
            f"data folder '{root}' mixes split folders ({', '.join(sorted(set(folders) - set(extra)))}) with other "
            f"folders ({', '.join(extra)}): for the pre-split layout keep only train/ with val/ and/or test/ "
            "(each holding the class folders); otherwise use one subfolder per class"
        )
    skipped: list[dict] = []
    if presplit:
        subset_folders = {PRESPLIT_FOLDERS[name]: name for name in folders}
        subset_dirs = {subset: root / name for subset, name in subset_folders.items()}
        if len(subset_dirs) != len(folders):
            raise UserError(
                f"data folder '{root}' has more than one validation folder ({', '.join(folders)}): keep one of "
                "val/, valid/ or validation/"
            )
        class_names = _visible_subfolders(subset_dirs["train"])
        for folder in subset_dirs.values():
            extra = sorted(set(_visible_subfolders(folder)) - set(class_names))
            if extra:
                raise UserError(
                    f"class folder(s) {extra} in '{folder}' have no counterpart in '{subset_dirs['train']}': every "
                    "class needs training images; add them to train/ or remove the folder(s)"
                )
            _note_stray_images(root, folder, skipped)
        candidates = {
            subset: _image_files(root, [folder / name for name in class_names])
            for subset, folder in subset_dirs.items()
        }
    else:
        class_names, subset_folders = folders, {}
        candidates = {"all": _image_files(root, [root / name for name in class_names])}
    _note_stray_images(root, root, skipped)

    if not class_names:
        stray = " (it holds images directly: move them into one subfolder per class)" if skipped else ""
        raise UserError(
            f"data folder '{root}' has no class subfolders{stray}: put the images into one subfolder per class, "
            f"e.g. '{root / 'cats' / 'image1.jpg'}' and '{root / 'dogs' / 'image2.jpg'}'"
        )
    if len(class_names) == 1:
        hint = (
            " (a train/ folder needs val/ or test/ beside it for the pre-split layout)" if folders == ["train"] else ""
        )
        raise UserError(
            f"data folder '{root}' has a single class ('{class_names[0]}'){hint}: a classifier needs at least two "
            "class subfolders; add a folder of images for every other class"
        )
    total = sum(len(files) for files in candidates.values())
    if total == 0:
        raise UserError(
            f"no image files in the class folders of '{root}' (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            f"{', '.join(sorted(dicom.EXTENSIONS))} and DICOM files without a suffix): put the images into one "
            "subfolder per class"
        )

    checks = _check_all([root / rel for files in candidates.values() for rel, _ in files], decoding)
    label_of = {name: label for label, name in enumerate(class_names)}
    images: dict[str, list[tuple[str, int]]] = {}
    groups: dict[str, str] = {}
    position = 0
    for subset, files in candidates.items():
        images[subset] = []
        for rel, name in files:
            checked = checks[position]
            position += 1
            if checked.reason is not None:
                skipped.append({"path": rel, "reason": checked.reason})
                continue
            if decoding.dicom_frames == "all" and checked.frames > 1:
                images[subset] += [(frame_ref(rel, frame), label_of[name]) for frame in range(checked.frames)]
            else:
                images[subset].append((rel, label_of[name]))
            key = _group_key(group_kind, pattern, rel, checked.patient_id)
            if key is not None:
                groups[rel] = group_hash(group_kind, key)  # the raw key (a patient ID) is not kept
    skipped.sort(key=lambda entry: entry["path"])
    _check_class_counts(root, class_names, images, candidates, skipped)
    usable = {split_frame_ref(rel)[0] for files in images.values() for rel, _ in files}
    _check_groups(group_by, group_kind, groups, len(usable))
    return ScanResult(
        root=str(root),
        class_names=class_names,
        images=images,
        skipped=skipped,
        folders=subset_folders,
        group_by=group_by,
        groups=groups,
    )


def _group_key(kind: str, pattern: re.Pattern | None, rel: str, patient_id: str | None) -> str | None:
    """The group of one file before hashing: its patient ID, or the pattern's match in its path; None for none."""
    if kind == "dicom_patient":
        return patient_id
    if kind == "filename_regex":
        match = pattern.search(rel)
        if match is None:
            return None
        return match.group(1) if pattern.groups and match.group(1) is not None else match.group(0)
    return None


def _check_groups(group_by: str, kind: str, groups: dict[str, str], usable: int) -> None:
    """A pattern that matches no file is a mistake; files left out of any group (`usable` counts files, not
    frames) are counted, not named."""
    if kind == "none" or usable == 0:
        return
    if kind == "filename_regex" and not groups:
        raise UserError(
            f"data.group_by {group_by!r} matches none of the image paths (paths relative to the data folder, e.g. "
            "'pneumonia/patient0042_view1.png'): fix the pattern, or use data.group_by=none"
        )
    alone = usable - len(groups)
    if alone > 0:
        what = "have no PatientID" if kind == "dicom_patient" else "do not match the pattern"
        log.info(f"note: data.group_by {group_by}: {alone} usable file(s) {what}; each is a group of its own.")


def _visible_subfolders(folder: Path) -> list[str]:
    """Sorted names of the subfolders that can be classes.

    Hidden folders, `IGNORED_FOLDERS` (`__MACOSX` and the like) and links that lead back to this folder or
    above it (which would make a class of copies of every image) are left out. Other symbolic links to folders,
    inside or outside the data folder, are followed: a documented choice, so that a class can live elsewhere.
    """
    here = folder.resolve()
    names = []
    for entry in os.scandir(folder):
        if not entry.is_dir() or entry.name.startswith(".") or entry.name in IGNORED_FOLDERS:
            continue
        if entry.is_symlink():
            target = Path(entry.path).resolve()
            if target == here or target in here.parents:
                continue
        names.append(entry.name)
    return sorted(names)


def _is_presplit(root: Path, folders: list[str]) -> bool:
    """`train/` plus `val/` or `test/`, nothing else, and class folders (not images) inside `train/`."""
    names = set(folders)
    return (
        "train" in names
        and len(names) > 1
        and names <= set(PRESPLIT_FOLDERS)
        and bool(_visible_subfolders(root / "train"))
    )


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether the scan and predict take a file: not hidden, and an image suffix, or DICOM (`dicom.is_dicom`)."""
    name = os.path.basename(os.fspath(path))
    if name.startswith("."):
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS or dicom.is_dicom(path)


def _image_files(root: Path, class_dirs: list[Path]) -> list[tuple[str, str]]:
    """(path relative to root, class name) of every image file (`is_image_file`) below each class folder."""
    found = []
    for class_dir in class_dirs:
        if not class_dir.is_dir():
            continue
        for folder, subfolders, files in os.walk(class_dir):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(files):
                if is_image_file(Path(folder, name)):
                    found.append((Path(folder, name).relative_to(root).as_posix(), class_dir.name))
    return found


def _note_stray_images(root: Path, folder: Path, skipped: list[dict]) -> None:
    """Images lying beside the class folders belong to no class: list them instead of ignoring them silently."""
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if entry.is_file() and is_image_file(entry.path):
            rel = Path(entry.path).relative_to(root).as_posix()
            skipped.append({"path": rel, "reason": "not inside a class folder"})


def _check_all(paths: list[Path], decoding: Decoding) -> list[_Checked]:
    """`_check` over many files in threads (Pillow and the DICOM decoders release the GIL), in input order."""
    show = len(paths) >= _PROGRESS_MIN_FILES and sys.stderr.isatty()
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        results = pool.map(functools.partial(_check, decoding=decoding), paths)
        return list(tqdm(results, total=len(paths), desc="Checking images", unit="img", disable=not show))


def _check_class_counts(
    root: Path,
    class_names: list[str],
    images: dict[str, list[tuple[str, int]]],
    candidates: dict[str, list[tuple[str, str]]],
    skipped: list[dict],
) -> None:
    """Every class needs `MIN_IMAGES_PER_CLASS` usable images; the message names the class and what was skipped."""
    usable = Counter(label for files in images.values() for _, label in files)
    found = Counter(name for files in candidates.values() for _, name in files)
    for label, name in enumerate(class_names):
        if usable[label] >= MIN_IMAGES_PER_CLASS:
            continue
        owner = {rel: class_name for files in candidates.values() for rel, class_name in files}
        bad = [entry for entry in skipped if owner.get(entry["path"]) == name]
        detail = f"{found[name]} image file(s) found, {found[name] - usable[label]} unreadable"
        if bad:
            detail += ": " + "; ".join(f"{entry['path']}: {entry['reason']}" for entry in bad[:3])
        raise UserError(
            f"class '{name}' has {usable[label]} usable image(s) ({detail}); every class needs at least "
            f"{MIN_IMAGES_PER_CLASS}: add images to its folder under '{root}' or remove the folder"
        )


def split_scan(scan: ScanResult, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 42) -> Split:
    """Splits the scanned images per class into train / val / test, reproducibly.

    Each class is shuffled with its own seeded generator (seed and class name), then round(n x fraction) of its
    images go to val and to test, so every class is within half an image of the requested shares. (Two chained
    `sklearn.model_selection.train_test_split` calls can drift by more than one image per class, and fail with
    messages about the whole test set rather than the class at fault.)

    When images come in groups (a `group_by` put several images in one group, or the frames of a multi-frame
    file), whole groups are split instead (`_split_groups`), so that no group is in two subsets.

    Args:
        scan: From `scan_folder`.
        val_fraction: Share of each class for validation, in (0, 1).
        test_fraction: Share of each class for testing, in [0, 1).
        seed: The same seed on the same files gives the same split.

    Returns:
        The split; for the pre-split layout the folders as given, with any missing val/test split off train/.

    Raises:
        UserError: a class would get no validation image (or no test image while test_fraction > 0), or no
            training image; too few groups for the fractions.
    """
    wanted = {"val": val_fraction, "test": test_fraction}
    if scan.presplit:
        subsets = {name: list(scan.images.get(name, [])) for name in SUBSETS}
        carve = {name: wanted[name] for name in ("val", "test") if name not in scan.images}
        fractions: dict = {"presplit": True, **carve}
        pool = subsets["train"]
    else:
        subsets = {name: [] for name in SUBSETS}
        carve, fractions, pool = dict(wanted), dict(wanted), scan.images["all"]

    group_of = functools.partial(_group_of, scan.groups)
    grouped = len({group_of(rel) for rel, _ in pool}) < len(pool)
    by_class: dict[int, list[str]] = {label: [] for label in range(len(scan.class_names))}
    for rel, label in pool:
        by_class[label].append(rel)
    if carve and grouped:
        subsets["train"] = []
        for subset, chosen in _split_groups(pool, group_of, carve, seed, scan.group_by).items():
            subsets[subset].extend(chosen)
    elif carve:
        subsets["train"] = []
        for label, paths in by_class.items():
            parts = _split_class(scan.class_names[label], sorted(paths), carve, seed)
            for subset, chosen in parts.items():
                subsets[subset].extend((rel, label) for rel in chosen)

    for subset in SUBSETS:
        subsets[subset].sort()
        present = Counter(label for _, label in subsets[subset])
        required = subset == "train" or subset in scan.images or wanted[subset] > 0
        for label, name in enumerate(scan.class_names):
            if required and present[label] == 0:
                message = _empty_subset_message(scan, name, subset, len(by_class[label]), wanted)
                if grouped and subset in carve:
                    message = _empty_group_subset_message(scan, name, subset, pool, group_of, wanted)
                raise UserError(message)
    members = {name: {group_of(rel) for rel, _ in subsets[name]} for name in SUBSETS}
    if scan.presplit:
        pairs = (("train", "val"), ("train", "test"), ("val", "test"))
        shared = set().union(*(members[one] & members[other] for one, other in pairs))
        if shared:
            log.info(
                f"note: {len(shared)} group(s) (patients, name groups or multi-frame files) have images in more than "
                "one of the given train/val/test folders; a split made here would keep each group in one subset"
            )
    return Split(
        root=scan.root,
        class_names=list(scan.class_names),
        train=subsets["train"],
        val=subsets["val"],
        test=subsets["test"],
        skipped=list(scan.skipped),
        seed=seed,
        fractions=fractions,
        group_by=scan.group_by,
        groups={name: sorted(set(scan.groups.values()) & members[name]) for name in SUBSETS} if scan.groups else {},
    )


def _group_of(groups: dict[str, str], rel: str) -> str:
    """The group of one sample: its file's hashed group, else the file itself (so frames of a file stay together)."""
    file = split_frame_ref(rel)[0]
    return groups.get(file) or f"file:{file}"


def _split_groups(
    pool: list[tuple[str, int]], group_of: Callable[[str], str], carve: dict, seed: int, group_by: str
) -> dict[str, list[tuple[str, int]]]:
    """Stratified group split: scikit-learn's `StratifiedGroupKFold`, one fold held out per subset.

    Test is held out first as one of round(1 / test_fraction) folds, then val as one of the remaining images'
    folds, so each subset gets the nearest 1/k share of the images (0.15 -> 1/7 of all, then 1/6 of the rest:
    about 14 % each) with the class mix kept as far as whole groups allow.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    items = sorted(pool)
    labels = np.array([label for _, label in items])
    _, groups = np.unique([group_of(rel) for rel, _ in items], return_inverse=True)
    remaining, left, parts = np.arange(len(items)), 1.0, {}
    for subset in ("test", "val"):
        if subset not in carve:
            continue
        parts[subset] = []
        if carve[subset] <= 0:
            continue
        folds = max(2, round(left / carve[subset]))
        available = len(np.unique(groups[remaining]))
        if available < folds:
            flag = "--val-fraction" if subset == "val" else "--test-fraction"
            raise UserError(
                f"the grouped split ({group_by}, frames of one file together) needs at least {folds} groups to hold "
                f"out {carve[subset]} of the images for {subset}, and {available} are left: add images of more "
                f"groups (patients), or raise {flag}"
            )
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            # "The least populated class in y has only N members": checked per class after the split, with a
            # message that names the class and the fix.
            warnings.simplefilter("ignore", UserWarning)
            _, held = next(splitter.split(np.zeros((len(remaining), 1)), labels[remaining], groups[remaining]))
        parts[subset] = [items[i] for i in remaining[held]]
        remaining = np.delete(remaining, held)
        left -= carve[subset]
    parts["train"] = [items[i] for i in remaining]
    return parts


def _empty_group_subset_message(
    scan: ScanResult, name: str, subset: str, pool: list[tuple[str, int]], group_of: Callable, wanted: dict
) -> str:
    title = {"train": "training", "val": "validation", "test": "test"}[subset]
    label = scan.class_names.index(name)
    count = len({group_of(rel) for rel, image_label in pool if image_label == label})
    fix = "lower --val-fraction / --test-fraction" if subset == "train" else f"raise --{subset}-fraction"
    return (
        f"class '{name}' has images of {count} group(s) ({scan.group_by}; the frames of a file are one group) and "
        f"the grouped split, which keeps each group in one subset, gave it no {title} image: add images of more "
        f"groups (patients) to this class, or {fix}"
    )


def _split_class(name: str, paths: list[str], carve: dict, seed: int) -> dict[str, list[str]]:
    """Shuffles one class (seeded by seed and class name, so adding a class leaves the others' split alone)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    order = [paths[i] for i in rng.permutation(len(paths))]
    counts = {subset: math.floor(len(paths) * fraction + 0.5) for subset, fraction in carve.items()}
    parts, start = {}, 0
    for subset in ("val", "test"):
        if subset in counts:
            parts[subset] = order[start : start + counts[subset]]
            start += counts[subset]
    parts["train"] = order[start:]
    return parts


def _empty_subset_message(scan: ScanResult, name: str, subset: str, n_class: int, wanted: dict) -> str:
    title = {"train": "training", "val": "validation", "test": "test"}[subset]
    if scan.presplit and subset in scan.images:
        folder = scan.folders[subset]
        fix = "" if subset == "train" else f", or remove the {folder}/ folder to split {title} images off train/"
        return (
            f"class '{name}' has no {title} image in '{Path(scan.root) / folder}': add images to "
            f"'{Path(scan.root) / folder / name}'{fix}"
        )
    if subset == "train":
        return (
            f"class '{name}' has {n_class} image(s), all taken by validation and test: add images to this class or "
            f"lower --val-fraction / --test-fraction"
        )
    fraction = wanted[subset]
    flag = "--val-fraction" if subset == "val" else "--test-fraction"
    needed = math.ceil(0.5 / fraction - 1e-9)
    return (
        f"class '{name}' has {n_class} image(s): a {title} fraction of {fraction} gives it no {title} image "
        f"({n_class} x {fraction} rounds to 0). Add images to this class (at least {needed} at this fraction) or "
        f"raise {flag} to at least {math.ceil(50 / n_class) / 100:.2f}"
    )


def write_split(split: Split, path: str | os.PathLike) -> None:
    """Writes `split.json` atomically (a crash never leaves half a manifest).

    Args:
        split: The split.
        path: Target file, usually `<run folder>/split.json`.
    """
    atomic.write_text(path, json.dumps(split.to_json(), indent=1))


def read_split(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Split:
    """Loads a `split.json` written by `prepare_split`.

    Args:
        path: The `split.json` file.
        root: The data folder's current location when it moved since the split was made; None keeps the
            recorded one.

    Returns:
        The split, with `root` absolute.

    Raises:
        UserError: the file is missing or is not a split manifest.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text())
        split = Split(
            root=os.path.abspath(os.path.expanduser(os.fspath(root))) if root is not None else content["root"],
            class_names=list(content["class_names"]),
            train=_entries(content["train"], len(content["class_names"])),
            val=_entries(content["val"], len(content["class_names"])),
            test=_entries(content["test"], len(content["class_names"])),
            skipped=list(content.get("skipped", [])),
            seed=int(content["seed"]),
            fractions=dict(content["fractions"]),
            group_by=str(content.get("group_by", "none")),
            groups={name: list(hashes) for name, hashes in (content.get("groups") or {}).items()},
        )
    except FileNotFoundError:
        raise UserError(f"split file '{path}' does not exist: pass a run folder written by training") from None
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"split file '{path}' is not a valid split manifest ({type(error).__name__}: {error}): restore it, or "
            "start a new run (a new split is made when the run folder has no split.json)"
        ) from None
    for rel, _ in split.train + split.val + split.test:
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise UserError(
                f"split file '{path}' lists '{rel}', which is outside the data folder: training writes only paths "
                "inside it, so the file was edited or comes from elsewhere; restore it or start a new run."
            )
    return split


def _entries(items: list, num_classes: int) -> list[tuple[str, int]]:
    """A subset of split.json as (path, label) pairs, each checked: a path, and a label of one of the classes."""
    entries = []
    for rel, label in items:
        if not isinstance(rel, str) or not rel or isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"entry {[rel, label]!r} is not [relative path, class index]")
        if not 0 <= label < num_classes:
            raise ValueError(f"entry {[rel, label]!r} names class {label}, but there are {num_classes} classes")
        entries.append((rel, label))
    return entries


def prepare_split(
    data_dir: str | os.PathLike | None,
    run_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    decoding: Decoding | None = None,
    group_by: str = "none",
) -> Split:
    """The run's split: reused from `run_dir/split.json` when it exists, else made by scanning and written there.

    A reused split is never changed: images added to the folder later stay out of it, so a resumed run trains,
    validates and tests on exactly the images it started with.

    Args:
        data_dir: The data folder (its current location, if it moved). None reuses the recorded location.
        run_dir: The run folder (created if needed).
        val_fraction: Share of each class for validation.
        test_fraction: Share of each class for testing.
        seed: Seed of the split.
        decoding: How files are read (see `scan_folder`).
        group_by: Keep groups in one subset (see `scan_folder`).

    Returns:
        The split.

    Raises:
        UserError: see `scan_folder` and `split_scan`; also when there is no split.json and no data_dir.
    """
    manifest = Run(run_dir).split_path
    if manifest.exists():
        split = read_split(manifest, root=data_dir)
        requested = {"val": val_fraction, "test": test_fraction}
        recorded = {key: split.fractions[key] for key in ("val", "test") if key in split.fractions}
        if split.seed != seed or any(requested[key] != value for key, value in recorded.items()):
            log.info(
                f"Reusing the split in {manifest} (seed {split.seed}, fractions {split.fractions}); the requested "
                "seed/fractions apply to new runs only."
            )
        return split
    if data_dir is None:
        raise UserError(f"run folder '{run_dir}' has no {SPLIT_FILE}: pass --data-dir to make a new split")
    scan = scan_folder(data_dir, decoding, group_by)
    split = split_scan(scan, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_split(split, manifest)
    return split


def resize_image(image: tf.Tensor | np.ndarray, image_size: int, resize_mode: str = "stretch") -> tf.Tensor:
    """Resizes RGB pixels to a square, the one way training, evaluation and export all use.

    Args:
        image: uint8 (H, W, 3).
        image_size: Side of the output square.
        resize_mode: "stretch" (whole image, aspect ratio ignored) or "crop" (largest centred square, aspect kept).

    Returns:
        uint8 tensor (image_size, image_size, 3): bilinear with antialiasing, rounded back to integers.

    Raises:
        UserError: unknown resize_mode.
    """
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"resize mode '{resize_mode}' is unknown: use one of {', '.join(RESIZE_MODES)}")
    image = tf.convert_to_tensor(image)
    if resize_mode == "crop":
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        side = tf.minimum(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image = image[top : top + side, left : left + side]
    resized = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def load_and_resize(
    path: str | os.PathLike, image_size: int, resize_mode: str = "stretch", decoding: Decoding | None = None
) -> np.ndarray:
    """`load_image` then `resize_image`: the pixels `make_dataset` feeds the model for one file.

    Args:
        path: The image file (or a `frame_ref`).
        image_size: Side of the output square.
        resize_mode: "stretch" or "crop".
        decoding: As in `load_image`.

    Returns:
        uint8 array (image_size, image_size, 3).
    """
    return resize_image(load_image(path, decoding), image_size, resize_mode).numpy()


def _decode(path: tf.Tensor, decoding: Decoding) -> tf.Tensor:
    """Pillow decode inside the graph: the same pixels as `load_image` for every format and mode.

    tf.io.decode_image is faster on small JPEGs (bench/data_throughput.py: about 1.5x, and on par for ELPV's PNGs)
    but gives other pixels: its default DCT differs from Pillow by up to 4 levels on about 60% of the pixels of an
    ordinary JPEG, it takes the high byte of 16-bit PNGs (off by one on a quarter of the values), ignores EXIF
    orientation and cannot read TIFF. Resized images are cached after the first epoch, so decoding is paid once.
    """
    image = tf.numpy_function(functools.partial(load_image, decoding=decoding), [path], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return image


def make_dataset(
    split: Split,
    subset: str,
    *,
    image_size: int,
    batch_size: int,
    training: bool = False,
    resize_mode: str = "stretch",
    cache_budget_mb: int = 1024,
    seed: int = 42,
    disk_cache: str | os.PathLike | None = None,
    decoding: Decoding | None = None,
) -> tf.data.Dataset:
    """A tf.data pipeline over one subset of the split.

    Files are decoded in parallel and resized; the resized uint8 images are cached in memory when
    count x size x size x 3 bytes fits in `cache_budget_mb` (decode once, not every epoch). When they do not
    fit and `disk_cache` names a folder, they are decoded once into a file cache there (`disk_cache_folder`)
    and read back from it every epoch after.

    Args:
        split: The split.
        subset: "train", "val" or "test".
        image_size: Side of the square images.
        batch_size: Images per batch (the last batch may be smaller).
        training: Shuffle (seeded, a new order every epoch; images read from the disk cache within a window of
            `shuffle_buffer` images); False keeps the manifest order.
        resize_mode: "stretch" or "crop", see `resize_image`.
        cache_budget_mb: Memory allowed for the decoded images.
        seed: Shuffle seed.
        disk_cache: Root of the disk cache for images that do not fit in memory; None decodes every epoch.
        decoding: How files are read (`load_image`); None takes the defaults.

    Returns:
        Dataset of (images float32 [B, S, S, 3] in 0..255, labels int32 [B]); empty when the subset is.

    Raises:
        UserError: unknown resize_mode, files of the split are missing (the data folder changed or moved), or
            the disk lacks room for the disk cache.
    """
    dataset = decoded_images(
        split,
        subset,
        image_size=image_size,
        resize_mode=resize_mode,
        cache_budget_mb=cache_budget_mb,
        disk_cache=disk_cache,
        decoding=decoding,
        shuffle_seed=seed if training else None,
    )
    return batched(dataset, batch_size)


def shuffle_buffer(count: int, image_size: int, cache_budget_mb: int) -> int:
    """Decoded images a training shuffle holds: all `count` when they fit the memory budget, else as many as do.

    Images read from the disk cache come in the cache's (manifest) order and are shuffled within this window.
    """
    return max(1, min(count, cache_budget_mb * 2**20 // (image_size * image_size * 3)))


def decoded_images(
    split: Split,
    subset: str,
    *,
    image_size: int,
    resize_mode: str = "stretch",
    cache_budget_mb: int = 1024,
    disk_cache: str | os.PathLike | None = None,
    decoding: Decoding | None = None,
    shuffle_seed: int | None = None,
) -> tf.data.Dataset:
    """One subset's images, decoded and resized, one (uint8 [S, S, 3], label int32) element per file.

    Cached in memory when they fit `cache_budget_mb` (then every dataset built on this one shares the cache), else
    in a file cache under `disk_cache` (`disk_cache_folder`), else decoded on every pass. `make_dataset` batches
    it; a shuffle holds these uint8 elements, a quarter of the memory float32 batches would take.

    Args:
        shuffle_seed: Shuffle with this seed, a new order every pass; None keeps the manifest order. Images decoded
            on every pass are shuffled by file name (cheap to hold); cached ones after the cache, within
            `shuffle_buffer` images (a disk cache written in a shuffled order would replay that order to a
            reader expecting the manifest's).
        Others: as `make_dataset`.
    """
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"resize mode '{resize_mode}' is unknown: use one of {', '.join(RESIZE_MODES)}")
    decoding = decoding or Decoding()
    items = split.subset(subset)
    root = Path(split.root)
    _check_present(split, root, items)
    paths = tf.constant([os.fsencode(root / rel) for rel, _ in items], dtype=tf.string, shape=[len(items)])
    labels = tf.constant([label for _, label in items], dtype=tf.int32, shape=[len(items)])
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    in_memory = fits_cache(len(items), image_size, cache_budget_mb)
    cached = in_memory or (disk_cache is not None and bool(items))
    if shuffle_seed is not None and not cached:
        dataset = dataset.shuffle(max(1, len(items)), seed=shuffle_seed, reshuffle_each_iteration=True)

    def decode_resize(path, label):
        return resize_image(_decode(path, decoding), image_size, resize_mode), label

    dataset = dataset.map(decode_resize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if in_memory:
        dataset = dataset.cache()
    elif cached:
        folder = disk_cache_folder(disk_cache, root, items, image_size, resize_mode, decoding)
        dataset = _from_disk_cache(dataset, folder, len(items) * image_size * image_size * 3)
    if shuffle_seed is not None and cached:
        buffer = shuffle_buffer(len(items), image_size, cache_budget_mb)
        dataset = dataset.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    return dataset


def batched(dataset: tf.data.Dataset, batch_size: int, drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of `decoded_images` elements as the model takes them: (float32 pixels 0..255, labels)."""
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.map(lambda images, labels: (tf.cast(images, tf.float32), labels))
    return dataset.prefetch(tf.data.AUTOTUNE)


def disk_cache_folder(
    cache_root: str | os.PathLike,
    root: Path,
    items: list[tuple[str, int]],
    image_size: int,
    resize_mode: str,
    decoding: Decoding | None = None,
) -> Path:
    """The disk cache of one list of images at one size: named by a hash of what its pixels depend on.

    The key covers the images (path, size in bytes, modification time, label) in order, the size, the resize
    mode and the decoding (`Decoding.cache_key`), so a changed file, another split or another window gets a cache
    of its own and a stale one is never read.
    """
    digest = hashlib.sha256(f"{image_size}:{resize_mode}:{(decoding or Decoding()).cache_key}".encode())
    for rel, label in items:
        stat = (root / split_frame_ref(rel)[0]).stat()
        digest.update(f"\0{root / rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}".encode())
    return Path(cache_root) / f"{len(items)}x{image_size}-{digest.hexdigest()[:20]}"


def _from_disk_cache(decoded: tf.data.Dataset, folder: Path, nbytes: int) -> tf.data.Dataset:
    """`decoded` read from a finished tf.data file cache in `folder`, written first if there is none.

    tf.data's file cache is written under a temporary folder and renamed when a whole pass finished, so an
    interrupted or concurrent writer never leaves a half cache that a later run would read (tf.data itself
    refuses a cache another iterator is writing, and a killed writer leaves its lock file behind).
    """
    import shutil
    import uuid

    done = folder / "complete"
    if not done.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder.parent).free
        if free < nbytes * 1.1:
            raise UserError(
                f"the disk cache of the decoded images needs {nbytes / 2**30:.1f} GiB and {folder.parent} has "
                f"{free / 2**30:.1f} GiB free: free some space, point XDG_CACHE_HOME at a larger disk, or turn "
                "the disk cache off with --set data.disk_cache=false (every epoch then decodes every file again)."
            )
        for stale in folder.parent.glob(f".{folder.name}.*"):  # writers that were killed
            if time.time() - stale.stat().st_mtime > 24 * 3600:
                shutil.rmtree(stale, ignore_errors=True)
        building = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}"
        building.mkdir()
        log.info(f"Decoding {nbytes / 2**20:.0f} MB of images once into the disk cache {folder} ...")
        for _ in decoded.cache(str(building / "images")):
            pass
        (building / "complete").touch()
        try:
            building.rename(folder)
        except OSError:  # another process finished the same cache first: use that one
            shutil.rmtree(building, ignore_errors=True)
    return decoded.cache(str(folder / "images"))


def fits_cache(count: int, image_size: int, cache_budget_mb: int) -> bool:
    """Whether `count` decoded images of `image_size` fit in the cache budget (then `make_dataset` caches them)."""
    return count * image_size * image_size * 3 <= cache_budget_mb * 2**20


def _check_present(split: Split, root: Path, items: list[tuple[str, int]]) -> None:
    if items and not root.is_dir():
        raise UserError(
            f"data folder '{root}' recorded in the split no longer exists: pass --data-dir with its new location"
        )
    missing = [rel for rel, _ in items if not (root / split_frame_ref(rel)[0]).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} image(s) of the split are missing under '{root}' (e.g. '{missing[0]}'): the data folder "
            "changed since the split was made; restore the files, pass the folder's new location with --data-dir, "
            "or start a new run"
        )


def class_counts(split: Split, subset: str = "train") -> np.ndarray:
    """Images per class in one subset.

    Args:
        split: The split.
        subset: "train", "val" or "test".

    Returns:
        int array of length len(class_names).
    """
    labels = [label for _, label in split.subset(subset)]
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(split.class_names))


def class_weights(split: Split, force: bool = False) -> dict[int, float] | None:
    """Balanced loss weights from the training counts, when the classes are imbalanced.

    Imbalanced means the largest training class has more than `IMBALANCE_RATIO` (1.5) times the images of the
    smallest. The weights are scikit-learn's "balanced" ones, n_samples / (n_classes x count): a class with half
    the images weighs twice as much, and the mean weight per image stays 1.

    Args:
        split: The split.
        force: Return the weights even when the classes are balanced (`train.class_weights: on`).

    Returns:
        {label: weight}, or None when the classes are balanced enough to need no weighting (and not `force`).
    """
    from sklearn.utils.class_weight import compute_class_weight

    counts = class_counts(split, "train")
    assert counts.min() > 0, "split_scan guarantees training images for every class"
    if not force and counts.max() / counts.min() <= IMBALANCE_RATIO:
        return None
    labels = np.asarray([label for _, label in split.train])
    weights = compute_class_weight("balanced", classes=np.arange(len(counts)), y=labels)
    return {label: float(weight) for label, weight in enumerate(weights)}


def check_batch_size(split: Split, batch_size: int) -> None:
    """Fails early when one batch would need more images than the training set has.

    Args:
        split: The split.
        batch_size: Global batch size (per-device batch x number of devices).

    Raises:
        UserError: batch_size is larger than the number of training images.
    """
    n_train = len(split.train)
    if batch_size > n_train:
        raise UserError(
            f"batch size {batch_size} is larger than the training set ({n_train} images): pass --batch-size "
            f"{n_train} or smaller (with several devices, the per-device batch times the number of devices must "
            "fit), or add images"
        )
