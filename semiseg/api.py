"""The Python API: load a trained model from its weights file and segment images.

    import semiseg
    model = semiseg.load("runs/teacher/checkpoints/best/model.safetensors")
    result = model.predict("image.jpg")   # Instances: masks [N, H, W], boxes [N, 4], labels, scores
    names = [model.class_names[i] for i in result.labels]

`predict_to_dir` is `semiseg predict`: overlays and a COCO-results json for files and folders;
`export_weights` is `semiseg export` (ONNX), and `load(..., backend="onnxruntime", onnx=FILE)` runs
the exported network with onnxruntime instead of PyTorch (same post-processing, same results).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from semiseg.config import check_compile_backend, load_config
from semiseg.data.coco_panoptic import write_segment_ids
from semiseg.data.datasets import Sample
from semiseg.data.images import read_image
from semiseg.data.loader import collate
from semiseg.data.masks import encode_rle
from semiseg.data.unlabeled import image_files
from semiseg.engine.checkpoint import weights_file
from semiseg.engine.distributed import select_device
from semiseg.errors import ConfigError, DataError
from semiseg.export import OnnxRuntimeForward, export_onnx
from semiseg.restore import load_trained_model
from semiseg.structures import Instances, PanopticSegmentation
from semiseg.visualize import save_overlay
from semiseg.weights import atomic_write

ImageInput = Union[str, Path, Image.Image, np.ndarray]
Prediction = Union[Instances, PanopticSegmentation, torch.Tensor]  # by task: instance, panoptic, semantic
BACKENDS = ("pytorch", "onnxruntime")


class Predictor:
    """A model ready for inference, with its class names.

    predict(image) -> at the image's original size, on the CPU, by the model's task (`cfg.model.task`):
    instance: Instances: labels [N], masks [N, H, W] bool, boxes [N, 4] xyxy pixels, scores [N] (all
    kept; filter by score as needed); panoptic: PanopticSegmentation (segment_ids [H, W], segments);
    semantic: a [H, W] long class map.
    forward: what computes the network's outputs, `model` itself or an `OnnxRuntimeForward`.
    """

    def __init__(self, model: torch.nn.Module, cfg, class_names: list[str], category_ids: list[int],
                 device: torch.device, forward: Callable[..., dict] | None = None):
        self.model, self.cfg, self.device = model, cfg, device
        self.forward = forward if forward is not None else model
        self.class_names, self.category_ids = list(class_names), list(category_ids)
        self.transform = cfg.data.augmentation.test_transform()

    @torch.no_grad()
    def predict(self, images: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """One image (path, PIL image or uint8 [H, W, 3] RGB array) or a list of them."""
        if isinstance(images, (list, tuple)):
            return [self._predict_one(image) for image in images]
        return self._predict_one(images)

    def _predict_one(self, image: ImageInput) -> Prediction:
        array = as_rgb_array(image)
        tensor = torch.tensor(array).permute(2, 0, 1).contiguous()
        resized = self.transform.image_only(tensor, np.random.default_rng(0))
        batch = collate([Sample(resized, 0, tuple(array.shape[:2]))], self.cfg.model.head.size_divisibility)
        outputs = self.forward(batch.images.to(self.device), batch.image_sizes)
        return self.model.predict(outputs, batch.image_sizes, batch.orig_sizes)[0].to("cpu")


def as_rgb_array(image: ImageInput) -> np.ndarray:
    """[H, W, 3] uint8 RGB from a path, a PIL image or an array (DataError for anything else)."""
    if isinstance(image, (str, Path)):
        return read_image(Path(image))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"image array must be uint8 [H, W, 3] RGB, got {image.dtype} {list(image.shape)}")
        return image
    raise DataError(f"cannot read an image from {type(image).__name__} (expected a path, PIL image or array)")


def load(weights: Path | str, device: str | None = None, config: Path | str | None = None,
         backend: str = "pytorch", onnx: Path | str | None = None, compile: str = "none") -> Predictor:
    """A `Predictor` from a weights file or checkpoint folder (its student / single model).

    The model is rebuilt from the config embedded in the weights; `config` (a YAML file) is only
    needed for weights without one (e.g. converted official checkpoints).
    backend: "pytorch", or "onnxruntime" with `onnx` = the file `semiseg export` wrote from these
    weights (checked; CPU only).
    compile: "none" or a torch.compile backend for the PyTorch forward ("inductor": faster after a
    first call that compiles for minutes on a CPU; docs/benchmarks.md).
    """
    check_compile_backend(compile, "compile")
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if (backend == "onnxruntime") != (onnx is not None):
        raise ConfigError("the onnxruntime backend needs the exported file (--onnx FILE), and --onnx needs "
                          "--backend onnxruntime")
    if backend == "onnxruntime" and compile != "none":
        raise ConfigError("--compile applies to the PyTorch backend, not to onnxruntime")
    torch_device = select_device("cpu" if backend == "onnxruntime" else device or "auto")
    path = weights_file(Path(weights), "student")
    cfg = load_config(config) if config is not None else None
    model, cfg, info = load_trained_model(path, cfg, torch_device)
    class_names = info.class_names or [f"class {i}" for i in range(cfg.model.num_classes)]
    forward = OnnxRuntimeForward(model, cfg.model, Path(onnx)) if onnx is not None else None
    if compile != "none":
        forward = torch.compile(model, backend=compile)
    return Predictor(model, cfg, class_names, info.category_ids, torch_device, forward)


def export_weights(weights: Path | str, out: Path | str, config: Path | str | None = None) -> Path:
    """`semiseg export`: the network of a weights file (or checkpoint folder) as ONNX in `out` (see
    `semiseg.export`); `out` must not exist."""
    predictor = load(weights, device="cpu", config=config)
    path = export_onnx(predictor.model, predictor.cfg.model, Path(out))
    print(f"semiseg: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); run it with "
          f"`semiseg predict IMAGES --weights {weights} --backend onnxruntime --onnx {path}`")
    return path


def expand_image_paths(inputs: Sequence[Path | str]) -> list[Path]:
    """Image files of `inputs` (files as given, folders searched recursively), in order."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = image_files(item)
            if not found:
                raise DataError(f"{item}: no image files in this folder")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return paths


def predict_to_dir(images: Sequence[Path | str], weights: Path | str, out_dir: Path | str,
                   score_threshold: float = 0.5, device: str | None = None, config: Path | str | None = None,
                   backend: str = "pytorch", onnx: Path | str | None = None, compile: str = "none") -> Path:
    """`semiseg predict`: an overlay PNG per image and `predictions.json` in `out_dir`, by the model's task:

    - instance: the json holds COCO results (every prediction with its `file_name`, dataset category
      ids; the threshold only affects the overlays);
    - panoptic: `panoptic/<name>.png` (segment id = R + 256 G + 256^2 B) and a COCO panoptic style json
      (`annotations`: file_name, image, segments_info with id, category_id, isthing, score; `categories`);
    - semantic: `semantic/<name>.png` (8- or 16-bit contiguous class ids) and a json of the classes.

    config: the model's YAML config, for weights that embed none (as `load`); backend, onnx, compile: as
    `load`. An existing `predictions.json` is never overwritten (DataError).
    """
    out_dir = Path(out_dir)
    results_path = out_dir / "predictions.json"
    if results_path.exists():
        raise DataError(f"{results_path} already exists: choose another --out or remove it")
    paths = expand_image_paths(images)
    predictor = load(weights, device, config, backend, onnx, compile)
    task = predictor.cfg.model.task
    out_dir.mkdir(parents=True, exist_ok=True)
    results, used = [], set()
    for image_id, path in enumerate(tqdm(paths, desc="predict", unit="img", dynamic_ncols=True), start=1):
        array = read_image(path)
        prediction = predictor.predict(array)
        name = path.stem
        while name in used:
            name += "_"
        used.add(name)
        save_overlay(out_dir / f"{name}.png", array, as_instances(prediction), predictor.class_names,
                     score_threshold if task == "instance" else 0.0, show_boxes=task == "instance")
        if task == "instance":
            results += coco_results(prediction, image_id, str(path), predictor.category_ids)
        elif task == "panoptic":
            results.append(_save_panoptic(prediction, out_dir / "panoptic" / f"{name}.png", path, predictor))
        else:
            _save_label_map(prediction, out_dir / "semantic" / f"{name}.png", len(predictor.class_names))
    categories = [{"id": c, "name": n} for c, n in zip(predictor.category_ids, predictor.class_names)]
    content = {"instance": results, "panoptic": {"annotations": results, "categories": categories},
               "semantic": {"classes": [{"value": k, **c} for k, c in enumerate(categories)],
                            "images": [str(p) for p in paths]}}[task]
    text = json.dumps(content)
    atomic_write(results_path, lambda tmp: tmp.write_text(text))
    print(f"semiseg: {len(paths)} overlays and {results_path} ({task})")
    return out_dir


def as_instances(prediction: Instances | PanopticSegmentation | torch.Tensor) -> Instances:
    """Any task's prediction as Instances (for overlays): panoptic: one per segment; semantic: one per
    present class (score 1)."""
    if isinstance(prediction, Instances):
        return prediction
    if isinstance(prediction, PanopticSegmentation):
        ids = prediction.segment_ids
        masks = torch.stack([ids == s.id for s in prediction.segments]) if prediction.segments else \
            torch.zeros(0, *ids.shape, dtype=torch.bool)
        return Instances.from_masks(torch.tensor([s.label for s in prediction.segments], dtype=torch.long), masks,
                                    scores=torch.tensor([s.score for s in prediction.segments]))
    labels = prediction.unique()
    return Instances.from_masks(labels, prediction[None] == labels[:, None, None], scores=torch.ones(len(labels)))


def _save_panoptic(prediction: PanopticSegmentation, png: Path, image: Path, predictor: Predictor) -> dict:
    """Write the id map as a COCO panoptic PNG; its json entry."""
    png.parent.mkdir(parents=True, exist_ok=True)
    write_segment_ids(prediction.segment_ids.numpy(), png)
    segments = [{"id": s.id, "category_id": predictor.category_ids[s.label], "isthing": int(s.is_thing),
                 "score": s.score} for s in prediction.segments]
    return {"file_name": png.name, "image": str(image), "segments_info": segments}


def _save_label_map(prediction: torch.Tensor, png: Path, num_classes: int) -> None:
    """Write a [H, W] class map as an 8-bit (or, above 256 classes, 16-bit) PNG."""
    png.parent.mkdir(parents=True, exist_ok=True)
    array = prediction.numpy()
    Image.fromarray(array.astype(np.uint8) if num_classes <= 256 else array.astype(np.uint16)).save(png)


def coco_results(instances: Instances, image_id: int, file_name: str, category_ids: list[int]) -> list[dict]:
    """COCO results entries (RLE masks, xywh boxes) of one image's predictions."""
    entries = []
    for label, mask, box, score in zip(instances.labels.tolist(), instances.masks.numpy(),
                                       instances.boxes.tolist(), instances.scores.tolist()):
        x0, y0, x1, y1 = box
        entries.append({"image_id": image_id, "file_name": file_name,
                        "category_id": category_ids[label] if label < len(category_ids) else label,
                        "segmentation": encode_rle(mask), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return entries
