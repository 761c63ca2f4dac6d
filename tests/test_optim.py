"""Parameter groups (backbone LR, no decay on norms/embeddings), LR schedules, full-model clipping."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from semiseg.engine.optim import (build_lr_scheduler, build_optimizer, build_param_groups,
                                  clip_full_model_grad_norm, lr_factor)


@dataclass
class Solver:
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    schedule: str = "multistep"
    steps: tuple = (100, 150)
    gamma: float = 0.1
    poly_power: float = 0.9
    warmup_iters: int = 10
    warmup_factor: float = 0.001
    max_iter: int = 200


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_feat = nn.Embedding(5, 8)
        self.level_embed = nn.Parameter(torch.zeros(3, 8))
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.backbone.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.head = Head()
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def groups_by_name(model, **kwargs):
    return {g["name"]: g for g in build_param_groups(model, **kwargs)}


def test_backbone_lr_and_no_decay_on_norms_and_embeddings():
    groups = groups_by_name(Net(), lr=1.0, weight_decay=0.05, backbone_lr_mult=0.1)
    assert groups["backbone.0.weight"]["lr"] == pytest.approx(0.1)
    assert groups["backbone.0.weight"]["weight_decay"] == 0.05
    assert groups["backbone.1.weight"]["lr"] == pytest.approx(0.1)  # a backbone norm: backbone LR, no decay
    assert groups["backbone.pos_embed"]["weight_decay"] == 0.0
    assert groups["head.linear.weight"]["lr"] == 1.0
    assert groups["head.linear.weight"]["weight_decay"] == 0.05
    assert groups["head.linear.bias"]["weight_decay"] == 0.05
    for name in ("head.query_feat.weight", "head.level_embed", "head.norm.weight", "head.norm.bias",
                 "head.gn.weight", "backbone.1.bias"):
        assert groups[name]["weight_decay"] == 0.0, name
    assert "frozen.weight" not in groups  # frozen parameters are not optimised


def test_norm_and_embed_decay_are_configurable():
    groups = groups_by_name(Net(), lr=1.0, weight_decay=0.05, weight_decay_norm=0.01, weight_decay_embed=0.02)
    assert groups["head.norm.weight"]["weight_decay"] == 0.01
    assert groups["head.query_feat.weight"]["weight_decay"] == 0.02


def test_optimizer_holds_every_trainable_parameter_once():
    model = Net()
    shared = nn.Linear(4, 4)
    model.a, model.b = shared, shared
    optimizer = build_optimizer(model, Solver())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len({id(p) for p in params}) == len(trainable)
    assert isinstance(optimizer, torch.optim.AdamW)


def test_multistep_schedule_with_linear_warmup():
    s = Solver()
    assert lr_factor(0, s) == pytest.approx(0.001)
    assert lr_factor(5, s) == pytest.approx(0.001 * 0.5 + 0.5)  # detectron2: f*(1-a)+a, a = t/warmup
    assert lr_factor(10, s) == 1.0
    assert lr_factor(99, s) == 1.0
    assert lr_factor(100, s) == pytest.approx(0.1)
    assert lr_factor(150, s) == pytest.approx(0.01)


def test_poly_schedule():
    s = Solver(schedule="poly", warmup_iters=0)
    assert lr_factor(0, s) == 1.0
    assert lr_factor(100, s) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(200, s) == 0.0


def test_scheduler_applies_the_factor_per_group():
    model = Net()
    s = Solver(warmup_iters=0, steps=(2,))
    optimizer = build_optimizer(model, s)
    scheduler = build_lr_scheduler(optimizer, s)
    lrs = []
    for _ in range(4):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert lrs[1]["head.linear.weight"] == pytest.approx(1e-4)
    assert lrs[2]["head.linear.weight"] == pytest.approx(1e-5)
    assert lrs[2]["backbone.0.weight"] == pytest.approx(1e-6)


def test_full_model_clipping_scales_all_gradients_together():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = clip_full_model_grad_norm([a, b], max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)
    assert a.grad.tolist() == pytest.approx([0.6, 0.0], abs=1e-6)
    assert b.grad.tolist() == pytest.approx([0.8], abs=1e-6)
    # max_norm 0 only measures
    a.grad = torch.tensor([float("nan"), 0.0])
    assert not torch.isfinite(clip_full_model_grad_norm([a, b], max_norm=0.0))
