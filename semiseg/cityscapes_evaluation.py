"""The official Cityscapes instance AP (cityscapesscripts), reported beside COCO AP on the same predictions.

`CityscapesEvaluator` is a `CocoEvaluator` (same `add` / `gather` / `evaluate`) that also writes its
kept predictions in the benchmark's submission format into a temporary folder, one
`<city>_<seq>_<frame>_pred.txt` per ground-truth image listing `mask.png labelId confidence`, and runs
the steps of cityscapesscripts' `evaluateImgLists` on them and the `gtFine` instanceIds PNGs: AP
averaged over the overlaps 0.5:0.95 and AP50, per class and over the 8 classes (minimum region 100 px,
as the benchmark). The package is optional (`pip install semiseg[cityscapes]`); its cache of
ground-truth instances goes to the temporary folder, never beside the package. Two numpy-2 breakages
of cityscapesscripts 2.3.0 are avoided: `np.in1d` is provided during the call, and the json dump of
the matches (which cannot serialise numpy integers) is skipped.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from faster_coco_eval.core import mask as mask_utils
from PIL import Image

from semiseg.errors import ConfigError, DataError
from semiseg.evaluation import IOU_TYPES, CocoEvaluator


class CityscapesEvaluator(CocoEvaluator):
    """COCO AP plus {"cityscapes": {"AP", "AP50", "per_class"}} (percent) of the images of `gt_files`.

    coco_gt:  the COCO instances dict of the records (`records_to_coco`)
    gt_files: image id -> its `*_gtFine_instanceIds.png`
    """

    def __init__(self, coco_gt: dict[str, Any], gt_files: dict[int, Path], source: str = "<cityscapes>"):
        super().__init__(coco_gt, source=source)
        self.gt_files = dict(gt_files)

    def evaluate(self, iou_types: Iterable[str] = IOU_TYPES, image_ids: Iterable[int] | None = None) -> dict[str, dict]:
        metrics = super().evaluate(iou_types, image_ids)
        metrics["cityscapes"] = self.cityscapes_ap()
        return metrics

    def cityscapes_ap(self) -> dict[str, Any]:
        """Official AP and AP50 (percent) of the predictions added so far; images without any count as empty."""
        try:
            from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as official
        except ImportError:
            raise ConfigError("the Cityscapes AP needs cityscapesscripts: pip install 'semiseg[cityscapes]'") from None
        per_image: dict[int, list[dict]] = {}
        for r in self.results():
            per_image.setdefault(r["image_id"], []).append(r)
        with tempfile.TemporaryDirectory(prefix="semiseg_cityscapes_") as tmp:
            folder = Path(tmp)
            predictions = [self._write_predictions(folder, image_id, gt, per_image.get(image_id, []))
                           for image_id, gt in sorted(self.gt_files.items())]
            args = copy.deepcopy(official.args)
            args.predictionPath, args.predictionWalk = str(folder), None
            args.gtInstancesFile = str(folder / "gtInstances.json")
            args.exportFile = str(folder / "result.json")
            args.JSONOutput, args.quiet, args.colorized = False, True, False
            output = io.StringIO()
            try:
                with contextlib.redirect_stdout(output), _numpy_in1d():
                    # evaluateImgLists' steps, without its dump of the matches (which fails on numpy 2 ints)
                    official.setInstanceLabels(args)
                    ground_truth = [str(p) for p in sorted_values(self.gt_files)]
                    instances = official.getGtInstances(ground_truth, args)
                    matches = official.matchGtWithPreds([str(p) for p in predictions], ground_truth, instances, args)
                    averages = official.computeAverages(official.evaluateMatches(matches, args), args)
            except SystemExit:
                lines = [line for line in output.getvalue().splitlines() if line.strip()]
                raise DataError(f"cityscapesscripts: {lines[-1] if lines else 'evaluation failed'}") from None
        return {"AP": _percent(averages["allAp"]), "AP50": _percent(averages["allAp50%"]),
                "per_class": {name: _percent(v["ap"]) for name, v in averages["classes"].items()}}

    def _write_predictions(self, folder: Path, image_id: int, gt_file: Path, results: list[dict]) -> Path:
        """The image's masks as PNGs and its `<stem>_pred.txt` (relative mask path, label id, confidence)."""
        stem = Path(gt_file).name.removesuffix("_gtFine_instanceIds.png")
        lines = []
        for k, r in enumerate(results):
            mask_name = f"{stem}_{k}.png"
            Image.fromarray(mask_utils.decode(r["segmentation"]).astype(np.uint8) * 255).save(folder / mask_name)
            lines.append(f"{mask_name} {r['category_id']} {r['score']}")
        path = folder / f"{stem}_pred.txt"
        path.write_text("".join(line + "\n" for line in lines))
        return path


@contextlib.contextmanager
def _numpy_in1d():
    """cityscapesscripts 2.3.0 calls `np.in1d`, which numpy 2.4 removed: provide it (as `np.isin` on the
    flattened input, its documented equivalent) for the duration of the evaluation only."""
    missing = not hasattr(np, "in1d")
    if missing:
        np.in1d = lambda a, b, *args, **kwargs: np.isin(np.ravel(a), b, *args, **kwargs)
    try:
        yield
    finally:
        if missing:
            del np.in1d


def sorted_values(mapping: dict[int, Path]) -> list[Path]:
    return [mapping[k] for k in sorted(mapping)]


def _percent(value: float) -> float:
    return float(value * 100) if not math.isnan(value) else math.nan
