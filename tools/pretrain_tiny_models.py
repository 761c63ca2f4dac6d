"""Pretrain the whole tiny Mask2Former / Mask DINO on procedural pretext scenes; writes the weights semiseg ships.

The analogue, at CPU scale, of starting a detector from a COCO-pretrained model rather than from an
ImageNet backbone alone: the pixel decoder, the queries and the mask head learn to find and
delineate objects in general, so that a teacher fine-tuned on a few labels mostly has to learn
which shape is which class. The pretext scenes (`semiseg/data/pretext_shapes.py`: 12 shape classes
that share no class with the built-in dataset or the benchmark datasets, random fills and textured
backgrounds, 1-10 overlapping objects) are written as a COCO instances dataset and trained with
`semiseg train` on the preset `semiseg:tiny_<arch>` (backbone: the shipped `tiny_resnet_pretext`).
The class layers are kept in the file; `model.weights` re-initialises them when a dataset has
another number of classes.

    OMP_NUM_THREADS=1 python tools/pretrain_tiny_models.py --arch mask2former \
        --work /tmp/pretext_m2f --out semiseg/models/pretrained/tiny_mask2former_pretext.safetensors

Defaults: 8,000 training scenes + 200 validation scenes of 128 px (seed 0), 8,000 iterations of
batch 8 at lr 1e-3 (x0.1 for the last 20 %), LSJ 0.5-1.5. docs/pretrained.md has the time and
the pretext mask AP.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from semiseg.config import Config, apply_overrides, preset_overrides
from semiseg.data.masks import encode_rle
from semiseg.data.pretext_shapes import PRETEXT_CLASSES, render_pretext_image
from semiseg.models.registry import META_ARCHITECTURES
from semiseg.training import train
from semiseg.weights import atomic_write


def write_pretext_dataset(out_dir: Path, split: str, count: int, seed: int, size: int,
                          max_objects: int) -> tuple[Path, Path]:
    """Render `count` pretext scenes into `out_dir/split/*.png` + `out_dir/instances_split.json`."""
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(seed, i, size, max_objects, image_dir / f"{i:06d}.png") for i in range(1, count + 1)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        per_image = list(tqdm(pool.map(_render_and_save, tasks, chunksize=32), total=count,
                              desc=f"pretext {split}", unit="img"))
    images, annotations = [], []
    for (_, index, _, _, path), anns in zip(tasks, per_image):
        images.append({"id": index, "file_name": path.name, "height": size, "width": size})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": index, **a})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(PRETEXT_CLASSES)]
    ann = out_dir / f"instances_{split}.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann, image_dir


def _render_and_save(task: tuple[int, int, int, int, Path]) -> list[dict]:
    seed, index, size, max_objects, path = task
    scene = render_pretext_image(seed, index, size, max_objects=max_objects)
    Image.fromarray(scene.image).save(path)
    annotations = []
    for instance in np.unique(scene.instances[scene.instances > 0]):
        visible = scene.instances == instance
        if visible.sum() < 8:  # almost hidden behind later objects
            continue
        ys, xs = np.nonzero(visible)
        annotations.append({"category_id": int(scene.classes[visible][0]), "segmentation": encode_rle(visible),
                            "area": int(visible.sum()), "iscrowd": 0,
                            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                     float(ys.max() - ys.min() + 1)]})
    return annotations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=list(META_ARCHITECTURES), required=True)
    parser.add_argument("--work", type=Path, required=True, help="new folder for the pretext dataset and the run")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors to write")
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--iters", type=int, default=8000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-objects", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    train_ann, train_images = write_pretext_dataset(args.work / "data", "train", args.images, args.seed, 128,
                                                    args.max_objects)
    val_ann, val_images = write_pretext_dataset(args.work / "data", "val", 200, args.seed + 1, 128, args.max_objects)
    run = train(apply_overrides(Config(), preset_overrides(f"tiny_{args.arch}") + [
        f"data.train_ann={train_ann}", f"data.train_images={train_images}", f"data.val_ann={val_ann}",
        f"data.val_images={val_images}", "data.augmentation.kind=lsj", "data.augmentation.image_size=128",
        "data.augmentation.min_scale=0.5", "data.augmentation.max_scale=1.5",
        "data.augmentation.test_short_edge=128", "data.augmentation.test_max_size=128", "data.batch_size=8",
        "data.num_workers=1", "solver.backbone_lr_mult=1.0", "solver.amp=none", f"solver.max_iter={args.iters}",
        f"solver.lr={args.lr}", f"solver.steps=[{int(args.iters * 0.8)}]", "solver.warmup_iters=100",
        "solver.warmup_factor=0.01", f"train.eval_period={args.iters}", f"train.checkpoint_period={args.iters}",
        f"train.seed={args.seed}", f"train.output_dir={args.work / 'run'}", "train.log_period=50"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)  # the run's weights file, with its config and class names
    atomic_write(args.out, lambda tmp: shutil.copyfile(run / "checkpoints" / "last" / "model.safetensors", tmp))
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
