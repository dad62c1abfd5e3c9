"""Do mid-level features tell ELPV's defects apart better than the top ones? A linear probe per backbone level.

The classifier pools only the backbone's last map, the most ImageNet-specific one. Cracks and dark regions in a
solar cell are textures, which earlier blocks describe. This runs the pretrained, frozen backbone once over every
ELPV cell (plain images), average-pools the output of several blocks, and fits a logistic regression (C chosen on
validation AUC; bench/pooling_probe.py's probe) on each level alone and on concatenations, over the seeds'
70/15/15 stratified splits. Test accuracy and ROC-AUC as mean ± sd. A probe, not the product: no augmentation, no
fine-tuning, its own splits.

    python bench/multilevel_probe.py [--image-size 224] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from classifier.quiet import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import keras  # noqa: E402
from pooling_probe import BACKBONE, probe  # noqa: E402

from classifier import data, demo_data, model  # noqa: E402

LEVELS = ("block3b", "block4c", "block5c", "block6d", "block7a")  # block7a's group ends with the head conv (top)
COMBINATIONS = (
    ("block7a",),
    ("block6d",),
    ("block5c",),
    ("block4c",),
    ("block3b",),
    ("block5c", "block7a"),
    ("block4c", "block5c", "block7a"),
    ("block6d", "block7a"),
    LEVELS,
)


def pooled_levels(image_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Average-pooled outputs of each level in LEVELS for every ELPV cell, and 1 for `defective`."""
    folder = demo_data.materialize_elpv()
    files = sorted(folder.glob("*/*.png"))
    labels = np.array([path.parent.name == "defective" for path in files], dtype=int)
    classifier = model.build_classifier(BACKBONE, 2, image_size=image_size)
    backbone = model.backbone_of(classifier)
    ends = {name: layers[-1].output for name, layers in model.backbone_blocks(backbone)}
    pooled = [keras.layers.GlobalAveragePooling2D()(ends[name]) for name in LEVELS]
    inner = keras.Model(backbone.input, pooled)
    outputs = inner(classifier.get_layer("preprocess")(classifier.input))
    extractor = keras.Model(classifier.input, outputs)
    started, chunks = time.perf_counter(), []
    for start in range(0, len(files), 64):
        images = [np.asarray(data.resize_image(data.load_image(f), image_size)) for f in files[start : start + 64]]
        chunks.append(extractor.predict(np.stack(images).astype("float32"), verbose=0))
    print(f"pooled levels of {len(files)} cells at {image_size} px in {time.perf_counter() - started:.0f} s")
    levels = {name: np.concatenate([chunk[i] for chunk in chunks]) for i, name in enumerate(LEVELS)}
    return levels, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cache", help="an .npz to keep the pooled levels in (and read them from on a later call)")
    args = parser.parse_args()
    if args.cache and Path(args.cache).exists():
        stored = dict(np.load(args.cache))
        y = stored.pop("labels")
        levels = stored
    else:
        levels, y = pooled_levels(args.image_size)
        if args.cache:
            np.savez(args.cache, labels=y, **levels)
    print(f"\nELPV, {BACKBONE} at {args.image_size} px, linear probe, seeds {args.seeds}: test accuracy / AUC")
    for combination in COMBINATIONS:
        x = np.concatenate([levels[name] for name in combination], axis=1)
        results = [probe(x, y, seed) for seed in args.seeds]
        accuracy = [r[0] for r in results]
        auc = [r[1] for r in results]
        print(
            f"{' + '.join(combination):40s} {x.shape[1]:5d}  {statistics.mean(accuracy):.3f} ± "
            f"{statistics.stdev(accuracy):.3f}   {statistics.mean(auc):.3f} ± {statistics.stdev(auc):.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
