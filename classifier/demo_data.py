"""Datasets that are not a folder yet: the embedded ELPV demo and TensorFlow Datasets names.

Both are written once as ordinary class folders into a cache (`$XDG_CACHE_HOME/classifier`, else
`~/.cache/classifier`), so the rest of the toolkit only ever sees folders. A hidden marker file, written last,
makes a finished copy instant to reuse and an interrupted one get rebuilt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from importlib import metadata, resources
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from classifier.errors import UserError

MARKER = ".complete.json"  # hidden, so the folder scan ignores it
ELPV_DEFECT_THRESHOLD = 0.5  # defect probability >= 0.5 (annotated 2/3 or 1) counts as defective
ELPV_CLASSES = ("defective", "functional")
TFDS_PREFIX = "tfds:"
# TFDS serves prepared datasets and its metadata from this host; probing it (with the dataset's own download
# hosts) tells "offline" in a second, where TFDS itself retries with backoff for minutes.
_TFDS_HOST = "storage.googleapis.com"
_PROBE_TIMEOUT_S = 5.0
_TFDS_SUBSETS = {"train": "train", "validation": "val", "test": "test"}


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/classifier`, else `~/.cache/classifier`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "classifier"


def resolve_data_dir(data_dir: str | None, dataset: str | None, cache_dir: Path | None = None) -> Path:
    """The folder of images a run reads.

    Args:
        data_dir: A folder given by the user (--data-dir), used as is.
        dataset: "tfds:NAME" (TensorFlow Datasets, needs the internet the first time) or "elpv" (the demo).
        cache_dir: Where datasets are materialised; default `cache_root()`.

    Returns:
        The data folder. With neither argument, the ELPV solar-cell demo dataset.

    Raises:
        UserError: both arguments given, an unknown dataset form, a missing folder, or a dataset that
            cannot be materialised.
    """
    if data_dir and dataset:
        raise UserError("both --data-dir and --dataset were given: pass only one of them.")
    if data_dir:
        path = Path(data_dir).expanduser()
        if path.is_file():
            raise UserError(
                f"--data-dir '{data_dir}' is a file, not a folder: pass the folder that holds one subfolder per class"
            )
        if not path.is_dir():
            raise UserError(
                f"data folder '{data_dir}' does not exist: pass --data-dir pointing at a folder with one subfolder "
                "per class"
            )
        return path
    if not dataset or dataset.strip().lower() == "elpv":
        return materialize_elpv(cache_dir)
    if dataset.startswith(TFDS_PREFIX) and dataset[len(TFDS_PREFIX) :].strip():
        return materialize_tfds(dataset[len(TFDS_PREFIX) :].strip(), cache_dir)
    raise UserError(
        f"dataset '{dataset}' is not understood: use --dataset tfds:NAME (a TensorFlow Datasets name such as "
        "tfds:beans), --dataset elpv (the demo), or --data-dir FOLDER for your own images"
    )


def _is_complete(folder: Path, stamp: dict) -> bool:
    marker = folder / MARKER
    try:
        return json.loads(marker.read_text()).get("source") == stamp.get("source")
    except (OSError, ValueError):
        return False


def _publish(building: Path, folder: Path, stamp: dict) -> Path:
    """Writes the marker last, then swaps the finished folder into place."""
    (building / MARKER).write_text(json.dumps(stamp, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(building, folder)
    return folder


def _fresh(folder: Path) -> Path:
    """An empty sibling folder to build into (a half-built folder is never mistaken for a finished one)."""
    building = folder.with_name(f".{folder.name}.building")
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(parents=True)
    return building


def elpv_labels(probabilities) -> list[str]:
    """The demo's label rule: defect probability >= 0.5 -> "defective", else "functional".

    Args:
        probabilities: ELPV defect probabilities (0, 1/3, 2/3 or 1).

    Returns:
        One class name per probability.
    """
    return [ELPV_CLASSES[0] if float(p) >= ELPV_DEFECT_THRESHOLD else ELPV_CLASSES[1] for p in probabilities]


def materialize_elpv(cache_dir: Path | None = None) -> Path:
    """Writes the ELPV solar-cell images as `defective/` and `functional/` class folders (once).

    The `elpv-dataset` wheel ships 2,624 grayscale 300x300 PNGs and `labels.csv` (path, defect probability,
    mono/poly); the PNGs are copied unchanged, with their original names.

    Args:
        cache_dir: Cache root; the dataset goes into `cache_dir/elpv`. Default `cache_root()`.

    Returns:
        The class-folder dataset.

    Raises:
        UserError: the `elpv-dataset` package is not installed.
    """
    try:
        package = resources.files("elpv_dataset")
        version = metadata.version("elpv-dataset")
    except (ModuleNotFoundError, metadata.PackageNotFoundError):
        raise UserError(
            "the demo dataset needs the 'elpv-dataset' package: run `pip install -e '.[demo]'` (or `make demo`), "
            "or train on your own images with --data-dir FOLDER (one subfolder per class)"
        ) from None
    folder = Path(cache_dir or cache_root()) / "elpv"
    stamp = {"source": f"elpv-dataset=={version}", "rule": f"defective if probability >= {ELPV_DEFECT_THRESHOLD}"}
    if _is_complete(folder, stamp):
        return folder

    data = Path(str(package.joinpath("data")))
    # labels.csv: "images/cell0001.png  1.0  mono" (path, defect probability, module type), space-aligned.
    rows = [line.split() for line in (data / "labels.csv").read_text().splitlines() if line.strip()]
    names = elpv_labels(float(row[1]) for row in rows)
    building = _fresh(folder)
    for name in ELPV_CLASSES:
        (building / name).mkdir()
    for row, name in zip(rows, names, strict=True):
        source = data / row[0]
        shutil.copyfile(source, building / name / source.name)
    stamp["counts"] = {name: names.count(name) for name in ELPV_CLASSES}
    return _publish(building, folder, stamp)


def _safe_name(text: str) -> str:
    """A file-system-safe folder name (class names and dataset names may contain '/', ':' or spaces)."""
    cleaned = re.sub(r"[^\w.+-]+", "_", text).strip("._")
    return cleaned or "unnamed"


def _reachable(host: str, port: int = 443) -> bool:
    """TCP connect with a hard time limit (name resolution has no timeout of its own, hence the thread)."""

    def connect() -> bool:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            return True

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=_PROBE_TIMEOUT_S * 2)
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)


def _offline_error(name: str, host: str) -> UserError:
    return UserError(
        f"cannot download TensorFlow Datasets '{name}': {host} is unreachable, the machine seems offline. Train on "
        "a local folder with --data-dir FOLDER (one subfolder per class), or copy a prepared tensorflow_datasets "
        "folder here and point TFDS_DATA_DIR at it"
    )


def materialize_tfds(name: str, cache_dir: Path | None = None) -> Path:
    """Writes a TensorFlow Datasets image-classification dataset as class folders (once).

    The dataset's own splits are kept: with a `train` split and a `validation` and/or `test` split, the folder
    is the pre-split layout (`train/ val/ test/`, each with class folders); otherwise all examples go into one
    folder per class. Images are written as their original encoded bytes (no re-encoding).

    Args:
        name: TFDS name, optionally with config/version (e.g. "beans", "mnist:3.0.1").
        cache_dir: Cache root; the dataset goes into `cache_dir/tfds/<name>`. Default `cache_root()`.

    Returns:
        The data folder.

    Raises:
        UserError: unknown name, not an image classification dataset, or the download fails (offline).
    """
    folder = Path(cache_dir or cache_root()) / "tfds" / _safe_name(name)
    stamp = {"source": f"tfds:{name}"}
    if _is_complete(folder, stamp):
        return folder
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise UserError(f"--dataset tfds:{name} needs tensorflow-datasets ({error}): pip install -e .") from None

    try:
        builder = tfds.builder(name)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"'{name}' is not a TensorFlow Datasets name: see https://www.tensorflow.org/datasets/catalog/overview "
            "(image classification, e.g. tfds:beans or tfds:tf_flowers), or use --data-dir FOLDER"
        ) from None
    except ImportError as error:
        raise UserError(f"TensorFlow Datasets cannot load '{name}' here: {error}") from None
    # Behind a proxy a direct connection proves nothing: leave the download (and its error) to TFDS.
    proxied = any(os.environ.get(key) for key in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"))
    if not builder.is_prepared() and not proxied:
        try:
            hosts = {urlparse(url).hostname for url in (builder.url_infos or {})} - {None}
        except ImportError as error:  # tensorflow-datasets 4.9.10 needs importlib_resources without declaring it
            raise UserError(f"TensorFlow Datasets is missing a module ({error}): pip install -e . again") from None
        for host in sorted(hosts) or [_TFDS_HOST]:
            if not _reachable(host):
                raise _offline_error(name, host)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except OSError as error:  # requests' ConnectionError is an OSError
            raise UserError(
                f"downloading TensorFlow Datasets '{name}' failed ({error}): check the connection, or use --data-dir "
                "with a local folder"
            ) from None

    image_key, label_key = _image_and_label(builder, name)
    labels = builder.info.features[label_key].names
    encoding = getattr(builder.info.features[image_key], "encoding_format", None) or "png"
    suffix = ".jpg" if encoding == "jpeg" else f".{encoding}"
    splits = list(builder.info.splits.keys())
    presplit = "train" in splits and any(s in splits for s in ("validation", "test"))
    building = _fresh(folder)
    for split_name in splits:
        if presplit and split_name not in _TFDS_SUBSETS:
            continue
        base = building / _TFDS_SUBSETS[split_name] if presplit else building
        for label in labels:
            (base / _safe_name(label)).mkdir(parents=True, exist_ok=True)
        dataset = builder.as_dataset(
            split=split_name, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()}
        )
        total = builder.info.splits[split_name].num_examples
        show = sys.stderr.isatty() and total >= 500
        for index, example in enumerate(
            tqdm(tfds.as_numpy(dataset), total=total, desc=f"Writing {split_name}", disable=not show)
        ):
            target = base / _safe_name(labels[int(example[label_key])]) / f"{split_name}_{index:06d}{suffix}"
            target.write_bytes(example[image_key])
    return _publish(building, folder, stamp)


def _image_and_label(builder, name: str) -> tuple[str, str]:
    """The keys of the (first) Image and ClassLabel features."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    image = [key for key, feature in features.items() if isinstance(feature, tfds.features.Image)]
    label = [key for key, feature in features.items() if isinstance(feature, tfds.features.ClassLabel)]
    if not image or not label:
        raise UserError(
            f"TensorFlow Datasets '{name}' is not an image classification dataset (needs an image and a class label "
            f"feature; it has {list(features.keys())}): pick another name or use --data-dir"
        )
    return image[0], label[0]
