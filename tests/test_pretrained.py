"""The weights shipped with the package: they load by name, and they are not random (the tiny ResNet's
features tell pretext shapes apart; the whole tiny Mask2Former finds objects in new pretext scenes)."""
import dataclasses

import numpy as np
import pytest
import torch

from semiseg.config import load_config
from semiseg.data.pretext_shapes import PRETEXT_CLASSES, render_pretext_image
from semiseg.errors import CheckpointError
from semiseg.models.backbones import BackboneConfig, build_backbone
from semiseg.models.preprocess import IMAGENET_MEAN_255, IMAGENET_STD_255
from semiseg.weights import SHIPPED_WEIGHTS, load_checkpoint_file

PROBE_SEED = 1000  # the pretraining script renders seed 0; the probe images are new ones


def test_shipped_weights_are_package_files_of_a_few_megabytes():
    for path in SHIPPED_WEIGHTS.values():
        assert path.is_file() and 0.2e6 < path.stat().st_size < 5e6


def test_config_names_the_shipped_weights_and_the_backbone_loads_them(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  backbone: {name: tiny_resnet, weights: 'semiseg:tiny_resnet_pretext'}\n")
    cfg = load_config(config)
    assert str(cfg.model.backbone.weights) == "semiseg:tiny_resnet_pretext"  # a name, not resolved as a path
    backbone = build_backbone(cfg.model.backbone)
    shipped = load_checkpoint_file("semiseg:tiny_resnet_pretext")
    assert torch.equal(backbone.state_dict()["res5.0.conv2.weight"], shipped["res5.0.conv2.weight"])


def test_unknown_shipped_name_is_a_one_line_error():
    with pytest.raises(CheckpointError, match=r"semiseg:nope: semiseg ships no weights named 'nope'; choose one of "
                                              r"semiseg:tiny_resnet_pretext"):
        load_checkpoint_file("semiseg:nope")


def _probe_features(backbone: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """[N, S, S, 3] uint8 -> [N, C] pooled res4 + res5 features."""
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    with torch.no_grad():
        features = backbone.eval()(x)
    return torch.cat([features[k].mean((2, 3)) for k in ("res4", "res5")], 1)


def _linear_probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                           test_labels: torch.Tensor) -> float:
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(train.shape[1], len(PRETEXT_CLASSES))
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(train), train_labels).backward()
        optimizer.step()
    return (probe(test).argmax(1) == test_labels).float().mean().item()


def test_linear_probe_on_held_out_pretext_images_beats_chance_and_random_weights():
    rendered = [render_pretext_image(PROBE_SEED, i, size=64, single_centered=True) for i in range(360)]
    images = np.stack([r.image for r in rendered])
    labels = torch.tensor([int(r.classes[r.classes > 0].max()) - 1 for r in rendered])
    accuracies = {}
    for name, weights in (("pretrained", "semiseg:tiny_resnet_pretext"), ("random", None)):
        torch.manual_seed(0)
        backbone = build_backbone(BackboneConfig(name="tiny_resnet", weights=weights))
        features = _probe_features(backbone, images)
        accuracies[name] = _linear_probe_accuracy(features[:240], labels[:240], features[240:], labels[240:])
    chance = 1 / len(PRETEXT_CLASSES)  # measured: pretrained 0.82, random weights 0.07 (chance 0.08)
    assert accuracies["pretrained"] > 7 * chance, accuracies
    assert accuracies["pretrained"] > accuracies["random"] + 0.4, accuracies


def _mean_best_iou(predictor, scenes) -> float:
    """Over the objects of `scenes`, the mean IoU of the best-matching predicted mask (class-agnostic,
    predictions scored above 0.05)."""
    ious = []
    for scene in scenes:
        predicted = predictor.predict(scene.image)
        masks = predicted.masks[predicted.scores > 0.05].flatten(1).float()
        for instance in np.unique(scene.instances[scene.instances > 0]):
            truth = torch.from_numpy(scene.instances == instance).flatten().float()
            if truth.sum() < 64:
                continue
            inter = masks @ truth
            union = masks.sum(1) + truth.sum() - inter
            ious.append(float((inter / union.clamp(min=1)).max()) if len(masks) else 0.0)
    return float(np.mean(ious))


def test_shipped_whole_model_finds_objects_in_held_out_pretext_scenes():
    from semiseg.api import Predictor, load
    from semiseg.models.build import build_model

    scenes = [render_pretext_image(PROBE_SEED, i, 128, max_objects=6) for i in range(8)]
    pretrained = load(SHIPPED_WEIGHTS["tiny_mask2former_pretext"], device="cpu")
    cfg = pretrained.cfg
    torch.manual_seed(0)
    random_model = build_model(dataclasses.replace(cfg.model, weights=None), cfg.model.num_classes).eval()
    random = Predictor(random_model, cfg, pretrained.class_names, pretrained.category_ids, torch.device("cpu"))
    assert pretrained.class_names == list(PRETEXT_CLASSES)
    found, chance = _mean_best_iou(pretrained, scenes), _mean_best_iou(random, scenes)
    assert found > 0.6 and found > chance + 0.4, (found, chance)  # measured: 0.79 against 0.06
