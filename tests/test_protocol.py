"""The meta-architecture protocol (`semiseg.models.protocol`), checked on every implementation.

A new meta-architecture is added by giving `ARCHITECTURES` a builder and passing these tests; the
test double `PixelClassifier` passes them too, so Guided Distillation runs on it in tests.
"""
import json

import numpy as np
import pytest
import torch
from engine_doubles import PixelClassifier, toy_config

from semiseg.config import apply_overrides
from semiseg.data.datasets import Sample
from semiseg.data.loader import collate
from semiseg.data.samplers import InfiniteSampler
from semiseg.weights import WeightsInfo
from semiseg.engine.run_dir import prepare_run_dir
from semiseg.engine.stream import BatchStream
from semiseg.models.build import build_model
from semiseg.models.protocol import MetaArchitecture, PseudoLabelDefaults
from semiseg.semi.guided import GuidedDistillationTrainer
from semiseg.semi.pseudo_labels import ThresholdFilter
from semiseg.structures import Instances

NUM_CLASSES = 2
TINY_HEAD = ["hidden_dim=32", "conv_dim=32", "mask_dim=32", "nheads=4", "dim_feedforward=64",
             "enc_dim_feedforward=64", "enc_layers=1", "dec_layers=2", "num_queries=8", "test_topk=10",
             "train_num_points=128"]


def _tiny(arch: str, extra: tuple[str, ...] = ()) -> torch.nn.Module:
    cfg = apply_overrides(toy_config("unused"), [f"model.arch={arch}", "model.backbone.name=tiny_resnet",
                                                  *(f"model.{arch}.{o}" for o in TINY_HEAD + list(extra))])
    return build_model(cfg.model, NUM_CLASSES)


ARCHITECTURES = {
    "pixel_classifier": lambda: PixelClassifier(NUM_CLASSES),
    "mask2former": lambda: _tiny("mask2former"),
    "maskdino": lambda: _tiny("maskdino", ("dec_nheads=4", "total_num_feature_levels=3", "dn_num=4")),
}


def _batch(size: int = 64) -> tuple:
    """Two images of valid sizes 64x64 and 48x56 on one canvas, each with a square and a bar."""
    samples = []
    for index, (h, w) in enumerate([(size, size), (48, 56)]):
        rng = np.random.default_rng(index)
        image = torch.from_numpy(rng.integers(0, 80, (3, h, w), dtype=np.uint8))
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        masks[0, 8:24, 8:24] = True
        masks[1, 30:36, 10:40] = True
        image[:, masks.any(0)] = 230
        samples.append(Sample(image, index + 1, (h, w), instances=Instances.from_masks(torch.tensor([0, 1]), masks)))
    return collate(samples, size_divisibility=32)


@pytest.fixture(params=list(ARCHITECTURES))
def model(request):
    torch.manual_seed(0)
    return ARCHITECTURES[request.param]().train()


def test_model_satisfies_the_protocol(model):
    assert isinstance(model, MetaArchitecture)
    defaults = model.pseudo_label_defaults
    assert isinstance(defaults, PseudoLabelDefaults)
    assert 0.0 <= defaults.score_threshold <= 1.0 and 0.0 < defaults.nms_iou <= 1.0


def test_loss_is_finite_differentiable_and_weights_unmatched_queries(model):
    batch = _batch()
    losses = model.loss(model(batch.images, batch.image_sizes, batch.targets), batch.targets)
    assert losses and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    torch.manual_seed(1)
    outputs = model(batch.images, batch.image_sizes, batch.targets)
    full, none = (float(sum(model.loss(outputs, batch.targets, unmatched_weight=w).values()).detach())
                  for w in (1.0, 0.0))
    assert none < full  # the unmatched queries' class loss is scaled away


def test_predictions_and_pseudo_label_candidates_have_the_protocol_shapes(model):
    batch = _batch()
    model.eval()
    with torch.no_grad():
        outputs = model(batch.images, batch.image_sizes)
        predictions = model.predict(outputs, batch.image_sizes, [(64, 64), (96, 112)])
        candidates = model.pseudo_label_candidates(outputs)
    assert [p.masks.shape[-2:] for p in predictions] == [(64, 64), (96, 112)]
    assert all(p.scores is not None and len(p.scores) == len(p.labels) for p in predictions)
    b, q, k = candidates.class_probs.shape
    assert (b, k) == (2, NUM_CLASSES) and candidates.is_object.shape == (b, q)
    assert candidates.is_object.dtype == torch.bool
    assert 0.0 <= float(candidates.class_probs.min()) and float(candidates.class_probs.max()) <= 1.0
    assert candidates.mask_logits.shape == (b, q, 64 // 4, 64 // 4)
    assert candidates.boxes is None or candidates.boxes.shape == (b, q, 4)


def test_pseudo_labels_from_the_candidates_train_the_model(model):
    """The Guided Distillation round trip: candidates -> filter -> targets at 1/4 resolution -> loss."""
    batch = _batch()
    model.eval()
    with torch.no_grad():
        candidates = model.pseudo_label_candidates(model(batch.images, batch.image_sizes))
    pseudo_labels = ThresholdFilter(score_threshold=0.0, min_area=0.0)(candidates, batch.image_sizes)
    assert all(p.masks.shape[-2:] == (16, 16) for p in pseudo_labels)
    model.train()
    losses = model.loss(model(batch.images, batch.image_sizes, pseudo_labels), pseudo_labels)
    assert all(torch.isfinite(v) for v in losses.values())


class _UnlabeledToys(torch.utils.data.Dataset):
    """The double's images without labels, the strong view a brightened copy."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> Sample:
        image = _batch().images[index % 2, :, :48, :48].clone()
        return Sample(image, index + 1, (48, 48), strong=(image.int() + 20).clamp(max=255).to(torch.uint8))

    def reseed(self, seed: int) -> None:
        pass


class _LabeledToys(_UnlabeledToys):
    def __getitem__(self, index: int) -> Sample:
        batch = _batch()
        target = batch.targets[index % 2]
        return Sample(batch.images[index % 2, :, :48, :48].clone(), index + 1, (48, 48),
                      instances=Instances.from_masks(target.labels, target.masks[:, :48, :48]))


def test_guided_distillation_runs_on_the_test_double(tmp_path):
    """GD needs nothing but the protocol: a few steps on PixelClassifier, teacher copied at burn-in."""
    cfg = toy_config(tmp_path / "run", "semi.enabled=true", "semi.burn_in_iter=2", "solver.max_iter=4",
                     "semi.ema_decay=0.5")
    streams = {name: BatchStream(dataset, InfiniteSampler(8, seed=0), 2, 0, seed=0)
               for name, dataset in (("labeled", _LabeledToys()), ("unlabeled", _UnlabeledToys()))}
    torch.manual_seed(0)
    student, teacher = PixelClassifier(), PixelClassifier()
    trainer = GuidedDistillationTrainer(cfg, student, teacher, streams, prepare_run_dir(cfg.train.output_dir, False, False),
                                        torch.device("cpu"), WeightsInfo(None, ["square", "bar"], [1, 2], "model"))
    assert trainer.pseudo_labeler.score_threshold == PixelClassifier.pseudo_label_defaults.score_threshold
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_ce_unsup" in record for record in logged)
    assert any(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # copied, then EMA
