"""ONNX export of a trained model, and an onnxruntime forward that replaces the PyTorch one.

    semiseg export --weights runs/teacher/checkpoints/best --out model.onnx
    semiseg predict images/ --weights runs/teacher/checkpoints/best --backend onnxruntime --onnx model.onnx

The graph is the network only: normalised, zero-padded images [B, 3, H, W] (H, W multiples of
`model.head.size_divisibility`; B, H and W dynamic) -> the final-layer `pred_logits`, `pred_masks`
(and Mask DINO's `pred_boxes`). Normalisation before it and the instance post-processing after it
(top-k, mask upsampling, boxes) stay in Python, shared with the PyTorch path, so both backends give
the same `Instances`. The file's metadata records the model config and a digest of the weights:
running it with other weights is an error, not a silent wrong result. Needs the optional extra
`pip install 'semiseg[onnx]'` (onnx, onnxscript, onnxruntime); torch.onnx's dynamo exporter, opset 18.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from semiseg.config import ModelConfig
from semiseg.errors import CheckpointError, ConfigError, DataError
from semiseg.weights import atomic_write

OPSET = 18
INPUT_NAME = "images"
METADATA_CONFIG = "semiseg.model_config"
METADATA_DIGEST = "semiseg.weights_sha256"
MAX_SIDE_BLOCKS = 1024  # export bound on H / size_divisibility and W / size_divisibility


class NetworkOnly(nn.Module):
    """The exported part of a Mask2Former or Mask DINO model: normalised images -> final-layer outputs."""

    def __init__(self, model: nn.Module, arch: str):
        super().__init__()
        self.model = model
        self.output_names = ["pred_logits", "pred_masks"] + (["pred_boxes"] if arch == "maskdino" else [])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images [B, 3, H, W] normalised and padded -> pred_logits [B, Q, K(+1)], pred_masks [B, Q, H/4, W/4]
        (, pred_boxes [B, Q, 4] cxcywh of the padded canvas)."""
        outputs = self.model.sem_seg_head(self.model.backbone(images))
        return tuple(outputs[name] for name in self.output_names)


def weights_digest(model: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of the model's state dict (order-independent of devices)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_description(model: nn.Module, model_cfg: ModelConfig) -> dict:
    """What the graph depends on: the architecture, the backbone (not where its weights came from)
    and the head as built (with the real number of classes)."""
    backbone = {k: v for k, v in dataclasses.asdict(model_cfg.backbone).items() if k not in ("weights", "download")}
    head = dataclasses.asdict(model.cfg)
    return json.loads(json.dumps({"arch": model_cfg.arch, "backbone": backbone, "head": head}, default=str))


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (needed by torch.onnx's exporter)
    except ImportError as e:
        raise ConfigError(f"ONNX export and the onnxruntime backend need the optional packages onnx, onnxscript "
                          f"and onnxruntime (pip install 'semiseg[onnx]'): {e}") from None
    return onnx, onnxruntime


def export_onnx(model: nn.Module, model_cfg: ModelConfig, out: Path,
                example_size: tuple[int, int] | None = None) -> Path:
    """Write `model` (built from `model_cfg`; eval mode, CPU) as ONNX to `out` (which must not exist) -> `out`.

    example_size: (H, W) of the example input the exporter traces (multiples of the size
    divisibility; default 2 x it); the file accepts any batch and any multiple.
    """
    onnx, _ = _onnx_modules()
    out = Path(out)
    if out.exists():
        raise DataError(f"{out} already exists: choose another --out or remove it")
    model = model.to("cpu").eval()
    divisor = model.cfg.size_divisibility
    h, w = example_size or (2 * divisor, 2 * divisor)
    if h % divisor or w % divisor:
        raise ConfigError(f"export example size {h}x{w}: expected multiples of {divisor}")
    network = NetworkOnly(model, model_cfg.arch).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    rows = torch.export.Dim("rows", min=1, max=MAX_SIDE_BLOCKS)
    cols = torch.export.Dim("cols", min=1, max=MAX_SIDE_BLOCKS)
    example = torch.zeros(2, 3, h, w)  # batch 2: a batch of 1 would be specialised to 1
    with torch.no_grad():
        program = torch.onnx.export(
            network, (example,), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[INPUT_NAME], output_names=network.output_names,
            dynamic_shapes={"images": {0: batch, 2: divisor * rows, 3: divisor * cols}})
    proto = program.model_proto
    description = json.dumps(model_description(model, model_cfg), sort_keys=True)
    for key, value in ((METADATA_CONFIG, description), (METADATA_DIGEST, weights_digest(model))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(out, lambda tmp: onnx.save(proto, str(tmp)))
    return out


class OnnxRuntimeForward:
    """A drop-in for `model(images, image_sizes)` in inference: the same dict of final-layer outputs,
    computed by onnxruntime from an exported file that must match `model` (config and weights)."""

    def __init__(self, model: nn.Module, model_cfg: ModelConfig, path: Path, threads: int | None = None):
        _, onnxruntime = _onnx_modules()
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such ONNX file (write one with `semiseg export`)")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise DataError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0]})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_CONFIG not in metadata:
            raise DataError(f"{path}: not written by `semiseg export` (no {METADATA_CONFIG} in its metadata)")
        exported, current = json.loads(metadata[METADATA_CONFIG]), model_description(model, model_cfg)
        if exported != current:
            raise CheckpointError(f"{path} was exported from a model with another config than these weights "
                                  f"({_first_difference(exported, current)}); export it again from them")
        if metadata.get(METADATA_DIGEST) != weights_digest(model):
            raise CheckpointError(f"{path} was exported from other weights than these (same config); "
                                  f"export it again from them")
        self.model = model
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> dict:
        x = self.model.normalize(images, image_sizes).cpu()
        values = self.session.run(self.output_names, {INPUT_NAME: x.numpy()})
        outputs = {name: torch.from_numpy(np.asarray(v)) for name, v in zip(self.output_names, values)}
        outputs["padded_size"] = (int(x.shape[-2]), int(x.shape[-1]))
        return outputs


def _first_difference(exported: dict, current: dict, prefix: str = "model") -> str:
    """'model.head.num_queries: 100 in the file, 50 in the weights' for the first differing field."""

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                found = walk(a.get(key), b.get(key), f"{path}.{key}")
                if found:
                    return found
            return None
        return None if a == b else f"{path}: {a!r} in the file, {b!r} in the weights"

    return walk(exported, current, prefix) or "the configs differ"
