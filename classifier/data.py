"""Folder of images -> validated files -> stratified split manifest -> tf.data pipelines.

Layouts (decided by `scan_folder`):
- one subfolder per class (`data/cats/*.jpg`, `data/dogs/*.png`; nested folders inside a class are searched too);
- pre-split: the top level holds `train/` and at least one of `val/` (also spelled `valid/` or `validation/`) and
  `test/`, each holding the same class folders. The given folders are used as given; a missing `val/` or `test/`
  is split off `train/` per class with the requested fraction, so every run still has all three subsets.

Every image file is opened and fully decoded once during the scan; empty, truncated and undecodable files are
listed in `split.json` under "skipped" with the reason and never stop a run. Hidden files and folders (names
starting with ".") and files whose suffix is not in `IMAGE_EXTENSIONS` are ignored.

Pixels: every mode becomes 3-channel RGB uint8 (`load_image`). Alpha is dropped, not composited: the stored colour
is kept, as `tf.io.decode_image(channels=3)` and Keras' folder loaders do. 16-bit grayscale is scaled by 255/65535
(rounded); 16-bit RGB PNGs are reduced by Pillow (high byte). EXIF orientation is applied, so images are used the way
every viewer shows them. Animated GIFs and multi-page TIFFs contribute their first frame.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from classifier.errors import UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)  # all read by the Pillow build this project pins (WebP and libtiff are compiled into its wheels)
SPLIT_FILE = "split.json"
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
    """

    root: str
    class_names: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    skipped: list[dict]
    seed: int
    fractions: dict

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
    """

    root: str
    class_names: list[str]
    images: dict[str, list[tuple[str, int]]]
    skipped: list[dict]
    folders: dict[str, str]

    @property
    def presplit(self) -> bool:
        """True for the `train/ val/ test/` layout."""
        return "all" not in self.images


def load_image(path: str | os.PathLike | bytes) -> np.ndarray:
    """Reads an image file as RGB pixels, whatever its format and mode.

    Args:
        path: The image file.

    Returns:
        uint8 array of shape (height, width, 3).

    Raises:
        OSError: the file is missing, empty, truncated or not an image (`PIL.UnidentifiedImageError` is one).
        ValueError: Pillow cannot convert the file's colour mode to RGB.
    """
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    with Image.open(path) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(
                f"too large: {image.width} x {image.height} pixels ({image.width * image.height / 1e6:.0f} MP) "
                f"is over the {MAX_PIXELS / 1e6:.0f} MP that is decoded; downscale the file"
            )
        image.load()  # the full decode: a truncated file fails here, not halfway through training
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Pillow image of any mode -> (H, W, 3) uint8."""
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


def check_image(path: str | os.PathLike) -> str | None:
    """Validates one file the way training will read it.

    Args:
        path: The file.

    Returns:
        None when `load_image` reads it, else the reason it cannot be used, e.g. "empty file (0 bytes)",
        "not an image: cannot identify image file" or "truncated or corrupt image: <Pillow's message>".
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        load_image(path)
    except UnidentifiedImageError:
        return "not an image: cannot identify image file"
    except Image.DecompressionBombError as error:
        return f"too large to decode safely: {error}"
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # Pillow's plugins raise all of these
        if str(error).startswith("too large:"):
            return str(error)
        return f"truncated or corrupt image: {error}"
    return None


def scan_folder(data_dir: str | os.PathLike) -> ScanResult:
    """Finds the classes and validates every image file of a data folder.

    Args:
        data_dir: Folder with one subfolder per class, or with `train/` plus `val/` and/or `test/`.

    Returns:
        The classes, the usable images and the skipped files with reasons.

    Raises:
        UserError: the folder is missing or empty, has a single class, or a class has fewer than
            `MIN_IMAGES_PER_CLASS` usable images.
    """
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
            f"no image files in the class folders of '{root}' (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}): "
            "put the images into one subfolder per class"
        )

    reasons = _check_all([root / rel for files in candidates.values() for rel, _ in files])
    label_of = {name: label for label, name in enumerate(class_names)}
    images: dict[str, list[tuple[str, int]]] = {}
    position = 0
    for subset, files in candidates.items():
        images[subset] = []
        for rel, name in files:
            reason = reasons[position]
            position += 1
            if reason is None:
                images[subset].append((rel, label_of[name]))
            else:
                skipped.append({"path": rel, "reason": reason})
    skipped.sort(key=lambda entry: entry["path"])
    _check_class_counts(root, class_names, images, candidates, skipped)
    return ScanResult(root=str(root), class_names=class_names, images=images, skipped=skipped, folders=subset_folders)


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


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_files(root: Path, class_dirs: list[Path]) -> list[tuple[str, str]]:
    """(path relative to root, class name) of every image-named, non-hidden file below each class folder."""
    found = []
    for class_dir in class_dirs:
        if not class_dir.is_dir():
            continue
        for folder, subfolders, files in os.walk(class_dir):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(files):
                if _is_image_name(name):
                    found.append((Path(folder, name).relative_to(root).as_posix(), class_dir.name))
    return found


def _note_stray_images(root: Path, folder: Path, skipped: list[dict]) -> None:
    """Images lying beside the class folders belong to no class: list them instead of ignoring them silently."""
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if entry.is_file() and _is_image_name(entry.name):
            rel = Path(entry.path).relative_to(root).as_posix()
            skipped.append({"path": rel, "reason": "not inside a class folder"})


def _check_all(paths: list[Path]) -> list[str | None]:
    """`check_image` over many files in threads (Pillow releases the GIL while decoding), in input order."""
    show = len(paths) >= _PROGRESS_MIN_FILES and sys.stderr.isatty()
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        results = pool.map(check_image, paths)
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

    Args:
        scan: From `scan_folder`.
        val_fraction: Share of each class for validation, in (0, 1).
        test_fraction: Share of each class for testing, in [0, 1).
        seed: The same seed on the same files gives the same split.

    Returns:
        The split; for the pre-split layout the folders as given, with any missing val/test split off train/.

    Raises:
        UserError: a class would get no validation image (or no test image while test_fraction > 0), or no
            training image.
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

    by_class: dict[int, list[str]] = {label: [] for label in range(len(scan.class_names))}
    for rel, label in pool:
        by_class[label].append(rel)
    if carve:
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
                raise UserError(_empty_subset_message(scan, name, subset, len(by_class[label]), wanted))
    return Split(
        root=scan.root,
        class_names=list(scan.class_names),
        train=subsets["train"],
        val=subsets["val"],
        test=subsets["test"],
        skipped=list(scan.skipped),
        seed=seed,
        fractions=fractions,
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
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(split.to_json(), indent=1))
    os.replace(temporary, path)


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
            train=[(str(rel), int(label)) for rel, label in content["train"]],
            val=[(str(rel), int(label)) for rel, label in content["val"]],
            test=[(str(rel), int(label)) for rel, label in content["test"]],
            skipped=list(content.get("skipped", [])),
            seed=int(content["seed"]),
            fractions=dict(content["fractions"]),
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


def prepare_split(
    data_dir: str | os.PathLike | None,
    run_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
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

    Returns:
        The split.

    Raises:
        UserError: see `scan_folder` and `split_scan`; also when there is no split.json and no data_dir.
    """
    manifest = Path(run_dir) / SPLIT_FILE
    if manifest.exists():
        split = read_split(manifest, root=data_dir)
        requested = {"val": val_fraction, "test": test_fraction}
        recorded = {key: split.fractions[key] for key in ("val", "test") if key in split.fractions}
        if split.seed != seed or any(requested[key] != value for key, value in recorded.items()):
            print(
                f"Reusing the split in {manifest} (seed {split.seed}, fractions {split.fractions}); the requested "
                "seed/fractions apply to new runs only."
            )
        return split
    if data_dir is None:
        raise UserError(f"run folder '{run_dir}' has no {SPLIT_FILE}: pass --data-dir to make a new split")
    split = split_scan(scan_folder(data_dir), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
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


def load_and_resize(path: str | os.PathLike, image_size: int, resize_mode: str = "stretch") -> np.ndarray:
    """`load_image` then `resize_image`: the pixels `make_dataset` feeds the model for one file.

    Args:
        path: The image file.
        image_size: Side of the output square.
        resize_mode: "stretch" or "crop".

    Returns:
        uint8 array (image_size, image_size, 3).
    """
    return resize_image(load_image(path), image_size, resize_mode).numpy()


def _decode(path: tf.Tensor) -> tf.Tensor:
    """Pillow decode inside the graph: the same pixels as `load_image` for every format and mode.

    tf.io.decode_image is faster on small JPEGs (bench/data_throughput.py: about 1.5x, and on par for ELPV's PNGs)
    but gives other pixels: its default DCT differs from Pillow by up to 4 levels on about 60% of the pixels of an
    ordinary JPEG, it takes the high byte of 16-bit PNGs (off by one on a quarter of the values), ignores EXIF
    orientation and cannot read TIFF. Resized images are cached after the first epoch, so decoding is paid once.
    """
    image = tf.numpy_function(load_image, [path], tf.uint8, stateful=False)
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
        training: Shuffle (seeded, a new order every epoch); False keeps the manifest order.
        resize_mode: "stretch" or "crop", see `resize_image`.
        cache_budget_mb: Memory allowed for the decoded images.
        seed: Shuffle seed.
        disk_cache: Root of the disk cache for images that do not fit in memory; None decodes every epoch.

    Returns:
        Dataset of (images float32 [B, S, S, 3] in 0..255, labels int32 [B]); empty when the subset is.

    Raises:
        UserError: unknown resize_mode, files of the split are missing (the data folder changed or moved), or
            the disk lacks room for the disk cache.
    """
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"resize mode '{resize_mode}' is unknown: use one of {', '.join(RESIZE_MODES)}")
    items = split.subset(subset)
    root = Path(split.root)
    _check_present(split, root, items)
    paths = tf.constant([os.fsencode(root / rel) for rel, _ in items], dtype=tf.string, shape=[len(items)])
    labels = tf.constant([label for _, label in items], dtype=tf.int32, shape=[len(items)])
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    cache = fits_cache(len(items), image_size, cache_budget_mb)
    buffer = max(1, len(items))
    if training and not cache:
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)  # file names: cheap to hold

    def decode_resize(path, label):
        return resize_image(_decode(path), image_size, resize_mode), label

    dataset = dataset.map(decode_resize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        dataset = dataset.cache()
        if training:
            dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    elif disk_cache is not None and items:
        folder = disk_cache_folder(disk_cache, root, items, image_size, resize_mode)
        dataset = _from_disk_cache(dataset, folder, len(items) * image_size * image_size * 3)
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(lambda images, labels: (tf.cast(images, tf.float32), labels))
    return dataset.prefetch(tf.data.AUTOTUNE)


def disk_cache_folder(
    cache_root: str | os.PathLike, root: Path, items: list[tuple[str, int]], image_size: int, resize_mode: str
) -> Path:
    """The disk cache of one list of images at one size: named by a hash of what its pixels depend on.

    The key covers the images (path, size in bytes, modification time, label) in order, the size and the resize
    mode, so a changed file or another split gets a cache of its own and a stale one is never read.
    """
    import hashlib

    digest = hashlib.sha256(f"{image_size}:{resize_mode}".encode())
    for rel, label in items:
        stat = (root / rel).stat()
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
        print(f"Decoding {nbytes / 2**20:.0f} MB of images once into the disk cache {folder} ...", flush=True)
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
    missing = [rel for rel, _ in items if not (root / rel).is_file()]
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
