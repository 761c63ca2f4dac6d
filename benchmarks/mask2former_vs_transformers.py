"""Mask2Former speed and memory: semiseg against Hugging Face `transformers`, measured in one run.

Both implementations get the same architecture (a ResNet backbone with BatchNorm, the deformable
pixel decoder, the masked-attention decoder), the same random weights (the HF model's weights are
copied into semiseg and the two eval outputs are compared before anything is timed), the same
uint8 input batch and the same targets (3 random instances per image). semiseg uses its own ResNet
(`semiseg.models.backbones.resnet`) built to HF's ResNetConfig: same layers, same FLOPs.

Metrics per row:
  train step  forward + loss + backward + AdamW step (train mode)
  inference   forward under torch.inference_mode() (eval mode; raw outputs, no post-processing,
              because the two post-processings differ)
  peak memory of one step in a fresh subprocess per (implementation, row, mode): on CPU the peak
              RSS increase over the RSS just before the step, on CUDA the max allocated increase.
              One warm-up step runs first (lazy initialisation, AdamW state) and the gradients
              are freed, so a train step's number covers activations, gradients and temporaries.
Times are medians over `--repeats` after `--warmup` runs; the implementations alternate
(A B, B A, A B, ...) so that machine load affects both alike. Ratios are semiseg / transformers
(< 1: semiseg is faster or smaller).

`--extra compiled,onnxruntime,maskdino` adds, timed in the same interleaved loop, semiseg under
`torch.compile` (train step and inference; compilation happens in the warm-up), the ONNX export
of semiseg's network run by onnxruntime (inference only: normalisation + `session.run`, the same
raw outputs, checked against eager before timing; `semiseg.export`) and semiseg's Mask DINO with the
row's sizes (no CPU peer exists: reported against semiseg's Mask2Former too). Memory is measured for
the eager Mask2Former implementations only.

    python benchmarks/mask2former_vs_transformers.py --rows tiny,r50 --repeats 5 --out results.md
    python benchmarks/mask2former_vs_transformers.py --rows tiny,r50 --extra compiled,onnxruntime --no-memory
    python benchmarks/mask2former_vs_transformers.py --rows r50 --profile train --threads 1   # where the time goes
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from semiseg.models.backbones.resnet import NORM_LAYERS, BasicBlock, ResNet, Stem, build_bottleneck_resnet
from semiseg.models.mask2former import Mask2Former, Mask2FormerConfig
from semiseg.models.maskdino import MaskDINO, MaskDINOConfig
from semiseg.structures import Instances

IMPLEMENTATIONS = ("semiseg", "transformers")
EXTRAS = ("compiled", "onnxruntime", "maskdino")
MODES = ("train", "inference")
INSTANCES_PER_IMAGE = 3
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Row:
    """One benchmarked configuration (model size, input size, batch, precision)."""

    name: str
    height: int
    width: int
    batch: int
    layer_type: str  # HF ResNetConfig layer type: "basic" or "bottleneck"
    embedding_size: int
    hidden_sizes: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    hidden_dim: int
    num_queries: int
    enc_layers: int
    enc_ffn: int
    dec_layers: int  # official DEC_LAYERS: dec_layers - 1 layers + the initial prediction
    dec_ffn: int
    num_classes: int
    train_num_points: int
    amp: bool = False
    cuda_only: bool = False

    def describe(self) -> str:
        backbone = "R50" if self.layer_type == "bottleneck" else f"basic ResNet {list(self.hidden_sizes)}"
        amp = ", AMP bf16" if self.amp else ""
        return (f"{self.batch}×{self.height}×{self.width}, {backbone}, hidden {self.hidden_dim}, "
                f"{self.num_queries} queries, enc {self.enc_layers}, dec {self.dec_layers}, "
                f"{self.num_classes} classes{amp}")


_R50 = dict(layer_type="bottleneck", embedding_size=64, hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 6, 3),
            hidden_dim=256, num_queries=100, enc_layers=6, enc_ffn=1024, dec_layers=10, dec_ffn=2048,
            num_classes=80, train_num_points=12544)
ROWS = {
    # the tiny HF-oracle config of shared/reference/mask2former-and-hf-oracle.md §2.7
    "tiny": Row("tiny", 128, 192, 2, layer_type="basic", embedding_size=16, hidden_sizes=(16, 32, 64, 128),
                depths=(1, 1, 1, 1), hidden_dim=64, num_queries=10, enc_layers=2, enc_ffn=128, dec_layers=4,
                dec_ffn=128, num_classes=5, train_num_points=1024),
    "r50": Row("r50", 512, 512, 1, **_R50),
    "r50-b2-amp": Row("r50-b2-amp", 512, 512, 2, amp=True, cuda_only=True, **_R50),
}


# --------------------------------------------------------------------------------------------- models

def build_resnet(row: Row) -> ResNet:
    """semiseg's ResNet (BatchNorm, like HF's ResNet) with the layers of `row`'s HF ResNetConfig."""
    norm = NORM_LAYERS["bn"]
    if row.layer_type == "bottleneck":
        if row.embedding_size != 64 or row.hidden_sizes != (256, 512, 1024, 2048):
            raise ValueError(f"row {row.name}: semiseg's bottleneck ResNet has 64 stem and 256..2048 stage channels")
        backbone = build_bottleneck_resnet(row.depths, "bn")
    else:
        stages, in_channels = [], row.embedding_size
        for index, (width, depth) in enumerate(zip(row.hidden_sizes, row.depths)):
            stages.append(nn.Sequential(*[
                BasicBlock(in_channels if b == 0 else width, width, stride=2 if b == 0 and index else 1, norm=norm)
                for b in range(depth)]))
            in_channels = width
        backbone = ResNet(Stem(row.embedding_size, kernel_size=7, norm=norm), stages, list(row.hidden_sizes))
    return backbone


def build_semiseg(row: Row) -> Mask2Former:
    """semiseg's Mask2Former on `build_resnet(row)`."""
    cfg = Mask2FormerConfig(
        num_classes=row.num_classes, hidden_dim=row.hidden_dim, num_queries=row.num_queries, nheads=8,
        dim_feedforward=row.dec_ffn, dec_layers=row.dec_layers, enc_layers=row.enc_layers,
        enc_dim_feedforward=row.enc_ffn, conv_dim=row.hidden_dim, mask_dim=row.hidden_dim,
        train_num_points=row.train_num_points, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    return Mask2Former(cfg, build_resnet(row))


def build_maskdino(row: Row) -> MaskDINO:
    """semiseg's Mask DINO on `build_resnet(row)` with the row's sizes (its own random weights; no peer
    exists): 3 encoder levels as the Mask2Former, the row's queries, `dec_layers - 1` decoder layers
    + the initial prediction (the same prediction count), Mask DINO's defaults otherwise (denoising)."""
    cfg = MaskDINOConfig(
        num_classes=row.num_classes, hidden_dim=row.hidden_dim, num_queries=row.num_queries, nheads=8,
        dec_nheads=8, dim_feedforward=row.dec_ffn, dec_layers=row.dec_layers - 1, enc_layers=row.enc_layers,
        enc_dim_feedforward=row.enc_ffn, conv_dim=row.hidden_dim, mask_dim=row.hidden_dim,
        total_num_feature_levels=3, train_num_points=row.train_num_points, pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD)
    return MaskDINO(cfg, build_resnet(row))


def build_transformers(row: Row) -> nn.Module:
    """HF `Mask2FormerForUniversalSegmentation` with a ResNetConfig backbone for `row` (random weights)."""
    import transformers
    from transformers import Mask2FormerConfig as HFMask2FormerConfig
    from transformers import Mask2FormerForUniversalSegmentation, ResNetConfig

    transformers.logging.set_verbosity_error()  # "resnet is not a supported backbone" is only advice
    backbone = ResNetConfig(embedding_size=row.embedding_size, hidden_sizes=list(row.hidden_sizes),
                            depths=list(row.depths), layer_type=row.layer_type,
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = HFMask2FormerConfig(
        backbone_config=backbone, feature_size=row.hidden_dim, mask_feature_size=row.hidden_dim,
        hidden_dim=row.hidden_dim, num_attention_heads=8, encoder_layers=row.enc_layers,
        encoder_feedforward_dim=row.enc_ffn, decoder_layers=row.dec_layers, dim_feedforward=row.dec_ffn,
        num_queries=row.num_queries, num_labels=row.num_classes, dropout=0.0, pre_norm=False,
        enforce_input_projection=False, common_stride=4, feature_strides=[4, 8, 16, 32],
        train_num_points=row.train_num_points, oversample_ratio=3.0, importance_sample_ratio=0.75,
        class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1,
        use_auxiliary_loss=True, output_auxiliary_logits=True)
    return Mask2FormerForUniversalSegmentation(cfg)


# HF parameter name -> semiseg name (detectron2 / official Mask2Former names); the first full match wins.
_HF_TO_SEMISEG = [(re.compile(p), r) for p, r in [
    # backbone
    (r"model\.pixel_level_module\.encoder\.embedder\.embedder\.convolution\.(.+)", r"backbone.stem.conv1.\1"),
    (r"model\.pixel_level_module\.encoder\.embedder\.embedder\.normalization\.(.+)", r"backbone.stem.conv1.norm.\1"),
    (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.(.+)",
     r"backbone.res<\1>.\2.shortcut.\3"),
    (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.(.+)",
     r"backbone.res<\1>.\2.shortcut.norm.\3"),
    (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.(.+)",
     r"backbone.res<\1>.\2.conv[\3].\4"),
    (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.(.+)",
     r"backbone.res<\1>.\2.conv[\3].norm.\4"),
    # pixel decoder
    (r"model\.pixel_level_module\.decoder\.input_projections\.(.+)", r"sem_seg_head.pixel_decoder.input_proj.\1"),
    (r"model\.pixel_level_module\.decoder\.level_embed", r"sem_seg_head.pixel_decoder.transformer.level_embed"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn\.(.+)",
     r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.self_attn.\2"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.(.+)",
     r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.norm1.\2"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.fc1\.(.+)",
     r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.linear1.\2"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.fc2\.(.+)",
     r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.linear2.\2"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.final_layer_norm\.(.+)",
     r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.norm2.\2"),
    (r"model\.pixel_level_module\.decoder\.mask_projection\.(.+)", r"sem_seg_head.pixel_decoder.mask_features.\1"),
    (r"model\.pixel_level_module\.decoder\.(adapter_\d+|layer_\d+)\.0\.(.+)", r"sem_seg_head.pixel_decoder.\1.\2"),
    (r"model\.pixel_level_module\.decoder\.(adapter_\d+|layer_\d+)\.1\.(.+)",
     r"sem_seg_head.pixel_decoder.\1.norm.\2"),
    # masked-attention decoder
    (r"model\.transformer_module\.queries_features\.(.+)", r"sem_seg_head.predictor.query_feat.\1"),
    (r"model\.transformer_module\.queries_embedder\.(.+)", r"sem_seg_head.predictor.query_embed.\1"),
    (r"model\.transformer_module\.level_embed\.(.+)", r"sem_seg_head.predictor.level_embed.\1"),
    (r"model\.transformer_module\.input_projections\.(.+)", r"sem_seg_head.predictor.input_proj.\1"),
    (r"model\.transformer_module\.decoder\.layernorm\.(.+)", r"sem_seg_head.predictor.decoder_norm.\1"),
    (r"model\.transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(.+)",
     r"sem_seg_head.predictor.mask_embed.layers.\1.\2"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(.+)",
     r"sem_seg_head.predictor.transformer_self_attention_layers.\1.self_attn.out_proj.\2"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.(.+)",
     r"sem_seg_head.predictor.transformer_self_attention_layers.\1.norm.\2"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn\.(.+)",
     r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.multihead_attn.\2"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(.+)",
     r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.norm.\2"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.fc1\.(.+)",
     r"sem_seg_head.predictor.transformer_ffn_layers.\1.linear1.\2"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.fc2\.(.+)",
     r"sem_seg_head.predictor.transformer_ffn_layers.\1.linear2.\2"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.final_layer_norm\.(.+)",
     r"sem_seg_head.predictor.transformer_ffn_layers.\1.norm.\2"),
    (r"class_predictor\.(.+)", r"sem_seg_head.predictor.class_embed.\1"),
    (r"criterion\.empty_weight", r"criterion.empty_weight"),
]]
_SELF_ATTN_QKV = re.compile(r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def _renumber(name: str) -> str:
    """`res<s>` (HF stage s, from 0) -> `res{s + 2}`; `conv[k]` (HF layer k, from 0) -> `conv{k + 1}`."""
    name = re.sub(r"res<(\d)>", lambda m: f"res{int(m[1]) + 2}", name)
    return re.sub(r"conv\[(\d)\]", lambda m: f"conv{int(m[1]) + 1}", name)


def transformers_to_semiseg_state(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Mask2Former state dict -> semiseg `Mask2Former` state dict (q/k/v packed into `in_proj`)."""
    out, qkv = {}, {}
    for key, value in hf_state.items():
        match = _SELF_ATTN_QKV.fullmatch(key)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        for pattern, replacement in _HF_TO_SEMISEG:
            if pattern.fullmatch(key):
                out[_renumber(pattern.sub(replacement, key))] = value
                break
        else:
            raise KeyError(f"no semiseg name for the transformers parameter {key}")
    for (layer, kind), parts in qkv.items():
        name = f"sem_seg_head.predictor.transformer_self_attention_layers.{layer}.self_attn.in_proj_{kind}"
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def build_pair(row: Row, device: torch.device) -> tuple[Mask2Former, nn.Module]:
    """(semiseg model, HF model) with identical weights, on `device`."""
    torch.manual_seed(0)
    theirs = build_transformers(row)
    ours = build_semiseg(row)
    ours.load_state_dict(transformers_to_semiseg_state(theirs.state_dict()), strict=True)
    return ours.to(device), theirs.to(device)


# ---------------------------------------------------------------------------------------------- data

@dataclass
class BenchBatch:
    """The shared input: images [B, 3, H, W] uint8 and B x Instances with masks [N, H, W]."""

    images: torch.Tensor
    targets: list[Instances]

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        return [tuple(self.images.shape[-2:])] * self.images.shape[0]


def make_batch(row: Row, device: torch.device, seed: int = 0) -> BenchBatch:
    """Random images and INSTANCES_PER_IMAGE random elliptic instances per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (row.batch, 3, row.height, row.width), generator=g, dtype=torch.uint8)
    ys = torch.arange(row.height).view(1, -1, 1).float()
    xs = torch.arange(row.width).view(1, 1, -1).float()
    targets = []
    for _ in range(row.batch):
        centre = torch.rand(INSTANCES_PER_IMAGE, 2, generator=g) * torch.tensor([row.height, row.width])
        radius = (0.1 + 0.3 * torch.rand(INSTANCES_PER_IMAGE, 2, generator=g)) * torch.tensor([row.height, row.width])
        masks = (((ys - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2
                 + ((xs - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2) < 1
        labels = torch.randint(0, row.num_classes, (INSTANCES_PER_IMAGE,), generator=g)
        targets.append(Instances.from_masks(labels, masks).to(device))
    return BenchBatch(images.to(device), targets)


# --------------------------------------------------------------------------------------------- steps

def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else nullcontext()


def make_step(impl: str, mode: str, model: nn.Module, batch: BenchBatch, amp: bool) -> Callable[[], None]:
    """A no-argument callable running one train step or one inference forward of `impl`.

    Sets the model's train/eval mode; a train step owns its AdamW optimizer (lr 1e-4, wd 0.05).
    impl "semiseg compiled": `model` is semiseg's model under torch.compile.
    """
    device = batch.images.device
    model.train(mode == "train")
    if impl.startswith("semiseg"):
        def forward():  # the targets only matter to Mask DINO's denoising queries in training
            return model(batch.images, batch.image_sizes, batch.targets if mode == "train" else None)

        def loss():
            return sum(model.loss(forward(), batch.targets).values())
    else:
        mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
        mask_labels = [t.masks.float() for t in batch.targets]
        class_labels = [t.labels for t in batch.targets]

        def forward():
            return model(pixel_values=(batch.images.float() - mean) / std)

        def loss():
            return model(pixel_values=(batch.images.float() - mean) / std, mask_labels=mask_labels,
                         class_labels=class_labels).loss

    if mode == "inference":
        def step():
            with torch.inference_mode(), _autocast(device, amp):
                forward()
        return step

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            total = loss()
        total.backward()
        optimizer.step()
    return step


def make_onnxruntime_step(model: Mask2Former, batch: BenchBatch, threads: int, folder: str) -> Callable[[], None]:
    """Inference of `model`'s ONNX export with onnxruntime on `threads` threads (checked against eager)."""
    import onnxruntime

    from semiseg.export import INPUT_NAME, OPSET, NetworkOnly

    model = model.cpu().eval()
    path = os.path.join(folder, "model.onnx")
    example = model.normalize(batch.images.cpu(), batch.image_sizes)
    with torch.no_grad():
        torch.onnx.export(NetworkOnly(model, "mask2former").eval(), (example,), path, dynamo=True, opset_version=OPSET,
                          verbose=False, input_names=[INPUT_NAME])
        expected = model(batch.images.cpu(), batch.image_sizes)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def step():
        session.run(None, {INPUT_NAME: model.normalize(batch.images, batch.image_sizes).numpy()})

    logits, masks = session.run(None, {INPUT_NAME: example.numpy()})[:2]
    difference = max((torch.from_numpy(logits) - expected["pred_logits"]).abs().max().item(),
                     (torch.from_numpy(masks) - expected["pred_masks"]).abs().max().item())
    if difference > 1e-3:
        raise SystemExit(f"onnxruntime and eager semiseg differ by {difference:.1e}; the timing would be meaningless")
    return step


@torch.no_grad()
def output_difference(ours: Mask2Former, theirs: nn.Module, batch: BenchBatch) -> dict[str, float]:
    """Max |semiseg - transformers| of the eval-mode class and mask logits (fp32), and their scale."""
    ours.eval()
    theirs.eval()
    mine = ours(batch.images, batch.image_sizes)
    mean = torch.tensor(PIXEL_MEAN, device=batch.images.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=batch.images.device).view(1, 3, 1, 1)
    hf = theirs(pixel_values=(batch.images.float() - mean) / std)
    return {
        "logits": (mine["pred_logits"] - hf.class_queries_logits).abs().max().item(),
        "masks": (mine["pred_masks"] - hf.masks_queries_logits).abs().max().item(),
        "mask_scale": hf.masks_queries_logits.abs().max().item(),
    }


# --------------------------------------------------------------------------------------------- timing

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
                        device: torch.device) -> dict[str, float]:
    """Median seconds per call of each step; the steps alternate A B, B A, A B, ... across repeats."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            steps[name]()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# --------------------------------------------------------------------------------------------- memory

def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_step_memory(impl: str, row: Row, mode: str, device: torch.device) -> int | None:
    """Bytes one step of `impl` needs beyond what is allocated before it (see the module docstring).

    Builds only this implementation, so run it in a fresh process. None when the peak cannot be read
    (CPU: no /proc/self/clear_refs, i.e. not Linux).
    """
    torch.manual_seed(0)
    model = (build_semiseg(row) if impl == "semiseg" else build_transformers(row)).to(device)
    batch = make_batch(row, device)
    step = make_step(impl, mode, model, batch, row.amp)
    step()  # warm-up: lazy initialisations and the AdamW state are not part of the measured step
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so it is not silently reused
    except OSError:
        pass
    if not _reset_peak_rss():
        return None
    before = _proc_status_kib("VmRSS")
    step()
    return (_proc_status_kib("VmHWM") - before) * 1024


def peak_step_memory_in_subprocess(impl: str, row: Row, mode: str, device: torch.device,
                                   threads: int) -> int | None:
    """`peak_step_memory` in a fresh Python process running this script with `--probe`."""
    command = [sys.executable, os.path.abspath(__file__), "--probe", f"{impl}:{row.name}:{mode}",
               "--device", device.type, "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {impl}:{row.name}:{mode} failed:\n{result.stderr.strip()}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


# --------------------------------------------------------------------------------------------- report

def machine_description(device: torch.device, threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores", f"torch {torch.__version__}"]
    try:
        import transformers
        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    parts.append(f"torch threads: {threads}")
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return "; ".join(parts)


def _ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}" if ours is not None and theirs else "n/a"


def _seconds(value: float) -> str:
    return f"{value:.3f} s" if value >= 0.1 else f"{value * 1000:.1f} ms"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2 ** 20:.0f} MiB"


def format_report(results: list[dict], args: argparse.Namespace, device: torch.device, threads: int) -> str:
    """Markdown: the header (date, machine, command) and one table row per (config, metric)."""
    lines = [
        "## Mask2Former: semiseg vs transformers",
        "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {machine_description(device, threads)}",
        f"- device: {device.type}",
        f"- command: `python benchmarks/mask2former_vs_transformers.py {' '.join(args.argv)}`",
        f"- times: median of {args.repeats} repeats after {args.warmup} warm-up run(s), the implementations "
        "alternating (A B, B A, ...); ratio = semiseg / transformers (< 1: semiseg faster / smaller)",
        "- memory: " + ("not measured (--no-memory)" if args.no_memory else
                        "peak increase during one step, fresh process per cell "
                        + ("(CUDA max allocated)" if device.type == "cuda" else "(CPU peak RSS)")),
        "",
    ]
    extras = [f"semiseg {e}" for e in EXTRAS if e in args.extra]
    ours_columns = ["semiseg", *extras]
    lines += ["| row | configuration | metric | transformers | " + " | ".join(ours_columns) + " | "
              + " | ".join(f"{c} / transformers" for c in ours_columns) + " |",
              "|---|---|---|" + "---:|" * (1 + 2 * len(ours_columns))]
    for result in results:
        row = result["row"]
        cells = [("train step", result["time"]["train"], _seconds),
                 ("inference", result["time"]["inference"], _seconds)]
        if not args.no_memory:
            cells += [("train step peak memory", result["memory"]["train"], _mib),
                      ("inference peak memory", result["memory"]["inference"], _mib)]
        for i, (metric, values, fmt) in enumerate(cells):
            first = (f"{row.name}", row.describe()) if i == 0 else ("", "")
            theirs = values["transformers"]
            ours = [values.get(c) for c in ours_columns]
            lines.append(f"| {first[0]} | {first[1]} | {metric} | {fmt(theirs)} | "
                         + " | ".join(fmt(v) if v is not None else "–" for v in ours) + " | "
                         + " | ".join(_ratio(v, theirs) if v is not None else "–" for v in ours) + " |")
    if "maskdino" in args.extra:
        lines += ["", "Mask DINO (no CPU peer; its own random weights, the row's sizes) against semiseg's Mask2Former:",
                  "", "| row | metric | semiseg Mask2Former | semiseg Mask DINO | Mask DINO / Mask2Former |",
                  "|---|---|---:|---:|---:|"]
        for result in results:
            for mode, label in (("train", "train step"), ("inference", "inference")):
                m2f, mdino = result["time"][mode]["semiseg"], result["time"][mode]["semiseg maskdino"]
                lines.append(f"| {result['row'].name} | {label} | {_seconds(m2f)} | {_seconds(mdino)} "
                             f"| {_ratio(mdino, m2f)} |")
    lines += ["", "Same function check (eval forward before timing, fp32): max |semiseg − transformers|",
              "", "| row | class logits | mask logits | max \\|mask logit\\| |", "|---|---:|---:|---:|"]
    for result in results:
        d = result["difference"]
        lines.append(f"| {result['row'].name} | {d['logits']:.1e} | {d['masks']:.1e} | {d['mask_scale']:.1f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main

def benchmark_row(row: Row, args: argparse.Namespace, device: torch.device, threads: int) -> dict:
    """Equivalence check, interleaved timings and (unless --no-memory) memory probes of one row."""
    ours, theirs = build_pair(row, device)
    batch = make_batch(row, device)
    difference = output_difference(ours, theirs, batch)
    if difference["masks"] > 1e-3 * max(difference["mask_scale"], 1.0) or difference["logits"] > 1e-3:
        raise SystemExit(f"row {row.name}: semiseg and transformers compute different outputs {difference}; "
                         "the comparison would be meaningless")
    result = {"row": row, "difference": difference, "time": {}, "memory": {}}
    compiled = torch.compile(ours) if "compiled" in args.extra else None
    maskdino = build_maskdino(row).to(device) if "maskdino" in args.extra else None
    with tempfile.TemporaryDirectory() as folder:
        for mode in MODES:
            steps = {impl: make_step(impl, mode, model, batch, row.amp)
                     for impl, model in zip(IMPLEMENTATIONS, (ours, theirs))}
            if compiled is not None:
                steps["semiseg compiled"] = make_step("semiseg compiled", mode, compiled, batch, row.amp)
            if maskdino is not None:
                steps["semiseg maskdino"] = make_step("semiseg maskdino", mode, maskdino, batch, row.amp)
            if "onnxruntime" in args.extra and mode == "inference":
                if device.type != "cpu" or row.amp:
                    raise SystemExit("--extra onnxruntime: CPU fp32 rows only")
                steps["semiseg onnxruntime"] = make_onnxruntime_step(ours, batch, threads, folder)
            result["time"][mode] = interleaved_medians(steps, args.repeats, args.warmup, device)
            print(f"[{row.name}] {mode}: " + ", ".join(f"{k} {_seconds(v)}" for k, v in result["time"][mode].items()),
                  file=sys.stderr, flush=True)
    del ours, theirs, compiled, maskdino
    if not args.no_memory:
        for mode in MODES:
            result["memory"][mode] = {impl: peak_step_memory_in_subprocess(impl, row, mode, device, threads)
                                      for impl in IMPLEMENTATIONS}
            print(f"[{row.name}] {mode} memory: "
                  + ", ".join(f"{k} {_mib(v)}" for k, v in result["memory"][mode].items()),
                  file=sys.stderr, flush=True)
    return result


def profile_row(row: Row, mode: str, device: torch.device, top: int = 12) -> str:
    """The `top` operators by self CPU time of one step (after one warm-up step) of each implementation."""
    ours, theirs = build_pair(row, device)
    batch = make_batch(row, device)
    tables = []
    for impl, model in zip(IMPLEMENTATIONS, (ours, theirs)):
        step = make_step(impl, mode, model, batch, row.amp)
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            step()
        table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)
        tables.append(f"### {row.name} {mode}: {impl}\n\n```\n{table}```\n")
    return "\n".join(tables)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, torch.device, list[Row]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated rows out of {', '.join(ROWS)} (default: tiny,r50, plus "
                             "r50-b2-amp on cuda)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation and metric")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--extra", default="", help=f"comma-separated extra semiseg variants: {', '.join(EXTRAS)}")
    parser.add_argument("--out", default=None, help="also write the Markdown report to this file")
    parser.add_argument("--profile", choices=MODES, default=None,
                        help="instead of timing: torch.profiler's top operators of one step of each implementation")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # IMPL:ROW:MODE, used by the parent
    args = parser.parse_args(argv)
    args.argv = argv
    args.extra = [e.strip() for e in args.extra.split(",") if e.strip()]
    if set(args.extra) - set(EXTRAS):
        parser.error(f"--extra: choose from {', '.join(EXTRAS)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    default = "tiny,r50,r50-b2-amp" if device.type == "cuda" else "tiny,r50"
    names = [n.strip() for n in (args.rows or default).split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        parser.error(f"--rows: unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    rows = [ROWS[n] for n in names]
    cuda_only = [r.name for r in rows if r.cuda_only and device.type != "cuda"]
    if cuda_only:
        parser.error(f"--rows: {', '.join(cuda_only)} need --device cuda")
    return args, device, rows


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; print (and with --out write) the Markdown report and return it."""
    args, device, rows = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.probe:
        impl, row_name, mode = args.probe.split(":")
        print(json.dumps({"peak_bytes": peak_step_memory(impl, ROWS[row_name], mode, device)}))
        return ""
    if args.profile:
        report = "\n".join(profile_row(row, args.profile, device) for row in rows)
        print(report)
        return report
    results = [benchmark_row(row, args, device, threads) for row in rows]
    report = format_report(results, args, device, threads)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return report


if __name__ == "__main__":
    main()
