"""CocoEvaluator: agreement with pycocotools, perfect predictions, conventions and error handling."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from pycocotools import mask as pc_mask
from pycocotools.coco import COCO as PcCOCO
from pycocotools.cocoeval import COCOeval as PcCOCOeval

from semiseg.errors import ConfigError, DataError
from semiseg.evaluation import SUMMARY_KEYS, CocoEvaluator, format_metrics
from semiseg.structures import Instances

# pycocotools' decode warns about numpy 2's copy keyword; it is the reference here, not under test.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")

# Categories are deliberately unsorted and non-contiguous; "unused" has no ground truth.
CATEGORIES = [{"id": 40, "name": "kite"}, {"id": 2, "name": "person"}, {"id": 11, "name": "hydrant"},
              {"id": 5, "name": "car"}, {"id": 7, "name": "unused"}]
SORTED_NAMES = ["person", "car", "unused", "hydrant", "kite"]  # by category id: 2, 5, 7, 11, 40


def _box_mask(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _rle(mask: np.ndarray) -> dict:
    rle = pc_mask.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _ground_truth() -> dict:
    """4 images: polygons, compressed and uncompressed RLE, a crowd region, one image without objects.

    area and bbox come from the rasterised mask, as in COCO itself.
    """
    images = [{"id": 10, "height": 120, "width": 160}, {"id": 11, "height": 96, "width": 128},
              {"id": 12, "height": 64, "width": 64}, {"id": 13, "height": 64, "width": 80}]
    specs = [  # (image_id, category_id, segmentation, iscrowd)
        (10, 2, [[10, 5, 120, 5, 120, 110, 10, 110]], 0),                      # large polygon
        (10, 5, _rle(_box_mask(120, 160, 20, 125, 60, 158)), 0),              # medium compressed RLE
        (10, 11, [[130, 80, 150, 80, 140, 100]], 0),                           # small triangle
        (11, 5, _uncompressed_rle(_box_mask(96, 128, 60, 0, 90, 60)), 1),     # crowd region
        (11, 5, [[70, 10, 110, 10, 110, 50, 70, 50]], 0),
        (11, 40, _rle(_box_mask(96, 128, 5, 5, 13, 13)), 0),                  # small RLE
        (13, 2, [[2, 2, 30, 2, 30, 40, 2, 40]], 0),
        (13, 2, [[40, 10, 75, 10, 75, 60, 40, 60]], 0),
        (13, 11, _rle(_box_mask(64, 80, 45, 5, 60, 25)), 0),
    ]
    annotations = []
    for i, (image_id, cat, seg, crowd) in enumerate(specs):
        h, w = next((im["height"], im["width"]) for im in images if im["id"] == image_id)
        if isinstance(seg, list):
            rle = pc_mask.merge(pc_mask.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
            rle = pc_mask.frPyObjects(seg, h, w)
        else:
            rle = seg
        annotations.append({"id": 100 + i, "image_id": image_id, "category_id": cat, "segmentation": seg,
                            "iscrowd": crowd, "area": float(pc_mask.area(rle)),
                            "bbox": [float(v) for v in pc_mask.toBbox(rle)]})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _gt_masks(gt: dict) -> dict[int, list[tuple[int, np.ndarray, bool]]]:
    """image_id -> [(category_id, mask [H, W] uint8, iscrowd)] decoded with pycocotools."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = PcCOCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
    out: dict[int, list] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        out[ann["image_id"]].append((ann["category_id"], coco.annToMask(ann), bool(ann["iscrowd"])))
    return out


def _instances(labels: list[int], masks: list[np.ndarray], scores: list[float], h: int, w: int) -> Instances:
    if not labels:
        return replace(Instances.empty(h, w), scores=torch.zeros(0))
    return Instances.from_masks(torch.tensor(labels), torch.from_numpy(np.stack(masks)).bool(),
                                torch.tensor(scores, dtype=torch.float32))


def _noisy_evaluator(gt: dict) -> CocoEvaluator:
    """Shifted masks, a wrong label, duplicates, a hit on the crowd region and false positives."""
    ev = CocoEvaluator(gt)
    label_of = {cid: k for k, cid in enumerate(ev.category_ids)}
    rng = np.random.default_rng(0)
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        labels, masks, scores = [], [], []
        for i, (cat, mask, crowd) in enumerate(_gt_masks(gt)[img["id"]]):
            shifted = np.roll(mask, shift=(int(rng.integers(0, 4)), int(rng.integers(0, 4))), axis=(0, 1))
            wrong = i % 4 == 3
            labels.append((label_of[cat] + 1) % len(ev.category_ids) if wrong else label_of[cat])
            masks.append(shifted)
            scores.append(float(rng.uniform(0.3, 1.0)))
            if i % 2 == 0:  # a lower-scored duplicate
                labels.append(label_of[cat])
                masks.append(mask)
                scores.append(scores[-1] * 0.5)
        labels.append(label_of[2])  # a false positive on every image (the empty one included)
        masks.append(_box_mask(h, w, 0, w - 12, 9, w))
        scores.append(0.95)
        ev.add(img["id"], _instances(labels, masks, scores, h, w))
    return ev


def _pycocotools_metrics(gt: dict, results: list[dict], iou_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(stats [12], precision [T, R, K, A, M]) from pycocotools, detectron2-style (no bbox for segm)."""
    dets = copy.deepcopy(results)
    for d in dets:
        d.pop("bbox" if iou_type == "segm" else "segmentation")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = PcCOCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_eval = PcCOCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats, coco_eval.eval["precision"]


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_agrees_with_pycocotools(iou_type):
    gt = _ground_truth()
    ev = _noisy_evaluator(gt)
    ours = ev.evaluate([iou_type])[iou_type]
    stats, precision = _pycocotools_metrics(gt, ev.results(), iou_type)
    assert 10 < ours["AP"] < 90  # a non-trivial case
    for key, ref in zip(SUMMARY_KEYS, stats[:6]):
        if ref < 0:
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(ref * 100, abs=1e-6), key
    for k, name in enumerate(SORTED_NAMES):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            assert ours["per_class"][name] == pytest.approx(p.mean() * 100, abs=1e-6), name
        else:
            assert math.isnan(ours["per_class"][name]), name


def test_ground_truth_as_predictions_scores_100():
    gt = _ground_truth()
    ev = CocoEvaluator(gt)
    label_of = {cid: k for k, cid in enumerate(ev.category_ids)}
    for img in gt["images"]:
        objects = [(cat, m) for cat, m, crowd in _gt_masks(gt)[img["id"]] if not crowd]
        ev.add(img["id"], _instances([label_of[c] for c, _ in objects], [m for _, m in objects],
                                     [1.0] * len(objects), img["height"], img["width"]))
    metrics = ev.evaluate()
    for iou_type in ("segm", "bbox"):
        for key in SUMMARY_KEYS:
            assert metrics[iou_type][key] == pytest.approx(100.0), (iou_type, key)
        per_class = metrics[iou_type]["per_class"]
        assert math.isnan(per_class.pop("unused"))
        assert per_class == pytest.approx({n: 100.0 for n in SORTED_NAMES if n != "unused"})


def test_category_order_and_results_format(tmp_path):
    gt = _ground_truth()
    ev = CocoEvaluator(gt)
    assert ev.category_ids == [2, 5, 7, 11, 40]
    assert ev.class_names == SORTED_NAMES
    mask = torch.from_numpy(_box_mask(64, 80, 3, 4, 10, 20))[None]
    ev.add(13, Instances.from_masks(torch.tensor([4]), mask, torch.tensor([0.7])))
    (result,) = ev.results()
    assert result["image_id"] == 13 and result["category_id"] == 40
    assert result["bbox"] == [4.0, 3.0, 16.0, 7.0]  # xywh
    assert isinstance(result["segmentation"]["counts"], str)
    assert pc_mask.decode(result["segmentation"]).sum() == 7 * 16


def test_keeps_top_max_dets_per_image():
    gt = _ground_truth()
    ev = CocoEvaluator(gt, max_dets=5)
    masks = torch.zeros(8, 64, 80, dtype=torch.bool)
    for i in range(8):
        masks[i, i * 4:i * 4 + 3, :10] = True
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.6, 0.05])
    ev.add(13, Instances.from_masks(torch.zeros(8, dtype=torch.long), masks, scores))
    kept = sorted(r["score"] for r in ev.results())
    assert kept == pytest.approx([0.3, 0.6, 0.7, 0.8, 0.9])


def test_no_predictions_gives_zero_ap():
    metrics = CocoEvaluator(_ground_truth()).evaluate()
    for iou_type in ("segm", "bbox"):
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert metrics[iou_type][key] == 0.0
        assert metrics[iou_type]["per_class"]["car"] == 0.0
        assert math.isnan(metrics[iou_type]["per_class"]["unused"])


def test_missing_area_bbox_iscrowd_are_derived_from_the_mask():
    gt = _ground_truth()
    stripped = copy.deepcopy(gt)
    for ann in stripped["annotations"]:
        del ann["area"], ann["bbox"]
        if not ann["iscrowd"]:
            del ann["iscrowd"]
    results = _noisy_evaluator(gt).results()
    full, derived = CocoEvaluator(gt), CocoEvaluator(stripped)
    full.merge(results)
    derived.merge(results)
    assert derived.evaluate() == full.evaluate()


def test_mask_ap_uses_mask_area_for_the_size_split():
    """A false positive with a small mask but a medium-sized box must count against APs."""
    gt = {"images": [{"id": 1, "height": 64, "width": 64}], "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 100.0,
                           "bbox": [0.0, 0.0, 10.0, 10.0], "segmentation": _rle(_box_mask(64, 64, 0, 0, 10, 10))}]}
    diagonal = np.eye(64, dtype=np.uint8)  # mask area 64, box area 4096
    ev = CocoEvaluator(gt)
    ev.add(1, _instances([0, 0], [diagonal, _box_mask(64, 64, 0, 0, 10, 10)], [0.9, 0.5], 64, 64))
    segm = ev.evaluate(["segm"])["segm"]
    stats, _ = _pycocotools_metrics(gt, ev.results(), "segm")
    assert segm["APs"] == pytest.approx(stats[3] * 100)
    assert segm["APs"] < 100.0


def test_merge_of_split_results_matches_single_evaluator():
    gt = _ground_truth()
    single = _noisy_evaluator(gt)
    results = single.results()
    first, second = CocoEvaluator(gt), CocoEvaluator(gt)
    first.merge([r for r in results if r["image_id"] in (10, 12)])
    second.merge([r for r in results if r["image_id"] not in (10, 12)])
    first.merge(second.results())
    assert first.results() == results
    assert first.evaluate() == single.evaluate()
    first.gather()  # not distributed: a no-op
    assert first.results() == results


def test_image_ids_restricts_evaluation():
    gt = _ground_truth()
    ev = CocoEvaluator(gt)
    label_of = {cid: k for k, cid in enumerate(ev.category_ids)}
    objects = [(cat, m) for cat, m, crowd in _gt_masks(gt)[13] if not crowd]
    ev.add(13, _instances([label_of[c] for c, _ in objects], [m for _, m in objects], [1.0] * 3, 64, 80))
    assert ev.evaluate(["segm"])["segm"]["AP"] < 100.0
    assert ev.evaluate(["segm"], image_ids=[13])["segm"]["AP"] == pytest.approx(100.0)


def test_format_metrics_table():
    metrics = {"segm": {"AP": 12.345, "AP50": 30.0, "AP75": 10.0, "APs": 1.0, "APm": math.nan, "APl": 50.0,
                        "per_class": {}},
               "bbox": {"AP": 20.0, "AP50": 40.0, "AP75": 15.0, "APs": 2.0, "APm": 3.0, "APl": 60.0,
                        "per_class": {}}}
    lines = format_metrics(metrics).splitlines()
    assert lines[0].split() == list(SUMMARY_KEYS)
    assert lines[1].split() == ["segm", "12.35", "30.00", "10.00", "1.00", "nan", "50.00"]
    assert lines[2].split()[0] == "bbox"


def test_bad_input_raises_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="missing.json.*not found"):
        CocoEvaluator.from_json(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        CocoEvaluator.from_json(broken)
    bad = _ground_truth()
    bad["annotations"][0]["category_id"] = 99
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="bad.json.*unknown category id 99"):
        CocoEvaluator.from_json(path)

    ev = CocoEvaluator(_ground_truth())
    one = _instances([0], [_box_mask(64, 80, 0, 0, 5, 5)], [0.5], 64, 80)
    with pytest.raises(DataError, match="image id 999"):
        ev.add(999, one)
    with pytest.raises(DataError, match="120x160"):
        ev.add(10, one)
    with pytest.raises(ValueError, match="scores"):
        ev.add(13, replace(one, scores=None))
    with pytest.raises(ConfigError, match="keypoints"):
        ev.evaluate(["keypoints"])


def _gather_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gt = _ground_truth()
        results = _noisy_evaluator(gt).results()
        ev = CocoEvaluator(gt)
        ev.merge([r for r in results if r["image_id"] % world_size == rank])  # each rank holds half the images
        ev.gather()
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(ev.results(), f)
    finally:
        torch.distributed.destroy_process_group()


def test_gather_collects_every_rank_results(tmp_path):
    out_file = tmp_path / "gathered.json"
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2)
    assert json.loads(out_file.read_text()) == _noisy_evaluator(_ground_truth()).results()
