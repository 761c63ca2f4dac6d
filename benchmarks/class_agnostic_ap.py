"""Where does a model's mask AP go: finding and outlining objects, or naming them?

Each model (`--weights`, one or more) predicts every validation image; COCO's evaluation then runs
twice on the same predictions: as usual (mask AP, AR@100) and class-agnostic (COCOeval's
`useCats = 0`: every prediction may match every object, whatever the classes; a mask predicted with
several classes counts once, with its best score). A student whose
class-agnostic AP rises while its AP falls finds and outlines objects better but names them worse.

    python benchmarks/class_agnostic_ap.py --weights runs/bench/p10_s0/teacher/checkpoints/last \
        runs/bench/p10_s0/student/checkpoints/last --ann data/annotations/instances_val.json --images data/val
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json

from faster_coco_eval import COCO, COCOeval_faster
from tqdm import tqdm

from semiseg.api import coco_results, load

STATS = {"AP": 0, "AP50": 1, "AP75": 2, "AR100": 8}  # COCOeval.stats indices


def predictions(weights: str, coco: COCO, images: str, limit: int) -> list[dict]:
    """COCO results of one model on the first `limit` images of `coco`."""
    predictor = load(weights, device="cpu")
    results = []
    for image in tqdm(coco.dataset["images"][:limit], desc=weights, leave=False):
        instances = predictor.predict(f"{images}/{image['file_name']}")
        results += coco_results(instances, image["id"], image["file_name"], predictor.category_ids)
    return results


def best_class_only(results: list[dict]) -> list[dict]:
    """One entry per predicted mask: Mask2Former's top-k lists a query once per class it scores, so
    without classes its other classes would count as duplicates; keep the best-scored one."""
    best: dict[tuple, dict] = {}
    for entry in results:
        key = (entry["image_id"], str(entry["segmentation"]["counts"]))
        if key not in best or entry["score"] > best[key]["score"]:
            best[key] = entry
    return list(best.values())


def mask_ap(coco: COCO, results: list[dict], image_ids: list[int], use_cats: bool) -> dict[str, float]:
    """Mask AP, AP50, AP75 and AR@100 in %, with the classes or without (one entry per mask)."""
    results = results if use_cats else best_class_only(results)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval_faster(coco, coco.loadRes(results), iouType="segm")
        evaluation.params.imgIds = image_ids
        evaluation.params.useCats = int(use_cats)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: 100 * evaluation.stats[i] for name, i in STATS.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", required=True, help="checkpoint folders or weight files")
    parser.add_argument("--ann", required=True, help="validation COCO json")
    parser.add_argument("--images", required=True, help="validation image folder")
    parser.add_argument("--limit", type=int, default=10**9, help="first N validation images")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(args.ann)
    image_ids = [image["id"] for image in coco.dataset["images"][:args.limit]]
    rows = []
    print("| weights | " + " | ".join(STATS) + " | " + " | ".join(f"class-agnostic {name}" for name in STATS) + " |")
    print("|---|" + "---:|" * 2 * len(STATS))
    for weights in args.weights:
        results = predictions(weights, coco, args.images, args.limit)
        row = {"weights": weights, **mask_ap(coco, results, image_ids, True),
               **{f"agnostic_{k}": v for k, v in mask_ap(coco, results, image_ids, False).items()}}
        rows.append(row)
        print(f"| {weights} | " + " | ".join(f"{v:.2f}" for k, v in row.items() if k != "weights") + " |", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
