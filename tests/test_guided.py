"""Guided Distillation end to end on CPU with the real tiny Mask2Former and the built-in dataset.

The session-scoped `data` fixture (conftest.py) writes a tiny synthetic dataset, a 25 % labeled
split with its unlabeled complement, and a stage-1 teacher checkpoint (one supervised iteration).
"""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from gd_helpers import built, equal_states, gd_config, weights_of
from PIL import Image

from semiseg.data.datasets import UnlabeledDataset
from semiseg.data.loader import collate
from semiseg.data.transforms import AugmentationConfig
from semiseg.data.unlabeled import load_unlabeled
from semiseg.engine.evaluate import evaluate_from_cli
from semiseg.errors import ConfigError
from semiseg.models.protocol import PseudoLabelCandidates
from semiseg.semi.guided import GuidedDistillationTrainer
from semiseg.training import train
from semiseg.weights import read_model_weights

def test_semi_supervised_iterations_train_the_student_and_keep_the_teacher_during_burn_in(data, tmp_path):
    run = train(gd_config(data, tmp_path / "run", "solver.max_iter=3", "semi.burn_in_iter=100"))
    last = run / "checkpoints" / "last"
    teacher0 = weights_of(data["teacher"], "model")
    student, teacher = weights_of(last, "student"), weights_of(last, "teacher")
    # frozen, in eval mode (BatchNorm statistics untouched) and never stepped during burn-in
    assert equal_states(teacher, teacher0)
    # fresh student (as the reference): not the teacher's weights, and trained
    assert not torch.equal(student["sem_seg_head.predictor.class_embed.weight"],
                           teacher0["sem_seg_head.predictor.class_embed.weight"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["loss_ce_unsup"] > 0 and r["loss_mask_unsup"] > 0 and r["loss_ce"] > 0
        assert r["loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("loss_")), rel=1e-5)
    assert "pseudo-instances per unlabeled image" in (run / "log.txt").read_text()


def test_unlabeled_terms_are_weighted_and_suffixed(data, tmp_path):
    losses = {}
    for weight in (0.0, 1.0, 2.0):
        cfg = gd_config(data, tmp_path / f"w{weight}", f"semi.unsup_loss_weight={weight}")
        trainer = built(cfg)
        torch.manual_seed(0)
        losses[weight] = {k: float(v.detach()) for k, v in trainer.forward_losses().items()}
    zero, one, two = losses[0.0], losses[1.0], losses[2.0]
    unsup = [k for k in one if k.endswith("_unsup")]
    assert sorted(unsup) == sorted(k + "_unsup" for k in one if not k.endswith("_unsup"))
    for k in one:
        assert two[k] == pytest.approx(one[k] * (2.0 if k in unsup else 1.0), rel=1e-5)
    # weight 0: the unlabeled branch is skipped (labeled data only), the supervised terms are unchanged
    assert zero == {k: v for k, v in one.items() if k not in unsup}


def test_student_init_from_teacher_and_burn_in_copy(data, tmp_path):
    cfg = gd_config(data, tmp_path / "run", "semi.student_init=teacher", "semi.burn_in_iter=1", "solver.max_iter=1")
    trainer = built(cfg)
    teacher0 = weights_of(data["teacher"], "model")
    assert equal_states({k: v for k, v in trainer.student.state_dict().items()}, teacher0)
    trainer.train()
    trainer.before_step(1)  # iteration == burn_in_iter: teacher <- student, integer buffers included
    assert equal_states(trainer.teacher.state_dict(), trainer.student.state_dict())
    assert not equal_states(trainer.teacher.state_dict(), teacher0)


def test_resume_during_and_after_burn_in_matches_an_uninterrupted_run(data, tmp_path):
    common = ["semi.burn_in_iter=2", "semi.ema_decay=0.5"]
    straight = train(gd_config(data, tmp_path / "straight", "solver.max_iter=4", *common))
    chained = tmp_path / "chained"
    train(gd_config(data, chained, "solver.max_iter=1", *common))  # stops during burn-in
    train(gd_config(data, chained, "solver.max_iter=3", *common), resume=True)  # stops after it
    train(gd_config(data, chained, "solver.max_iter=4", *common), resume=True)
    for name in ("student", "teacher"):
        a = weights_of(straight / "checkpoints" / "last", name)
        b = weights_of(chained / "checkpoints" / "last", name)
        assert equal_states(a, b), name
    teacher0 = weights_of(data["teacher"], "model")
    assert not equal_states(weights_of(chained / "checkpoints" / "last", "teacher"), teacher0)


def test_evaluation_routing_during_training_and_in_eval(data, tmp_path):
    val = [f"data.val_ann={data['val_ann']}", f"data.val_images={data['val_images']}"]
    run = train(gd_config(data, tmp_path / "run", "solver.max_iter=1", "semi.eval_who=both", *val))
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in evals if "eval" in r]
    assert len(evals) == 1 and list(evals[0]) == ["student", "teacher"]
    assert "AP" in evals[0]["teacher"]["segm"]
    cfg = gd_config(data, tmp_path / "other", "semi.eval_who=teacher")
    trainer = built(cfg)
    assert list(trainer.eval_models()) == ["teacher"] and trainer.eval_models()["teacher"] is trainer.teacher

    results = evaluate_from_cli(run / "checkpoints" / "last", who="both", device="cpu")
    assert list(results) == ["student", "teacher"]
    for name in ("student", "teacher"):  # same weights, same val set, same numbers
        assert results[name]["segm"]["AP"] == pytest.approx(evals[0][name]["segm"]["AP"])
    assert list(evaluate_from_cli(run / "checkpoints" / "last", who="teacher", device="cpu")) == ["teacher"]


def test_teacher_from_an_official_guided_distillation_checkpoint(data, tmp_path):
    stage1 = weights_of(data["teacher"], "model")
    shifted = {k: v + 1 if v.is_floating_point() else v for k, v in stage1.items()}
    official = {**{f"modelTeacher.{k}": v for k, v in stage1.items()},
                **{f"modelStudent.{k}": v for k, v in shifted.items()}}
    torch.save({"model": official, "iteration": 5}, tmp_path / "model_best.pth")
    assert equal_states(read_model_weights(tmp_path / "model_best.pth"), stage1)
    assert equal_states(read_model_weights(data["teacher"]), stage1)  # semiseg checkpoint folder
    trainer = built(gd_config(data, tmp_path / "run", f"semi.teacher_weights={tmp_path / 'model_best.pth'}"))
    assert equal_states(trainer.teacher.state_dict(), stage1)


def test_missing_semi_inputs_are_config_errors(data, tmp_path):
    with pytest.raises(ConfigError, match="semi.teacher_weights"):
        built(gd_config(data, tmp_path / "a", "semi.teacher_weights=null"))
    with pytest.raises(ConfigError, match="data.unlabeled"):
        built(gd_config(data, tmp_path / "b", "data.unlabeled=null"))


class BrightRegionTeacher(torch.nn.Module):
    """An oracle 'teacher': one query whose mask is the bright part of the image it sees (1/4 res)."""

    def forward(self, images, image_sizes, targets=None):
        gray = images.float().mean(1, keepdim=True)  # [B, 1, H, W]
        return {"mask_logits": (torch.nn.functional.avg_pool2d(gray, 4) - 128.0) / 4.0}  # [B, 1, H/4, W/4]

    def pseudo_label_candidates(self, outputs):
        logits = outputs["mask_logits"]
        b = logits.shape[0]
        return PseudoLabelCandidates(class_probs=torch.ones(b, 1, 1), is_object=torch.ones(b, 1, dtype=torch.bool),
                                     mask_logits=logits)


def bright_cells(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] uint8 -> [H/4, W/4] bool: 4x4 cells brighter than the middle of the image's range."""
    cells = torch.nn.functional.avg_pool2d(image.float().mean(0, keepdim=True)[None], 4)[0, 0]
    return cells > (cells.max() + cells.min()) / 2


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum().clamp(min=1))


def test_pseudo_masks_from_the_weak_view_align_with_the_strong_view(data, tmp_path):
    # a white, off-centre square on black; scale >= 1 (no grey padding) + crop + flip move it around
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[12:44, 6:38] = 255
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    Image.fromarray(image).save(folder / "a.png")
    aug = AugmentationConfig(image_size=64, min_scale=1.0, max_scale=1.5, strong_blur_p=1.0, strong_jitter_p=1.0)
    dataset = UnlabeledDataset(load_unlabeled(folder), aug.train_transform(), aug.strong_transform())
    cfg = gd_config(data, tmp_path / "run", "semi.pseudo_labels.score_threshold=0.5")
    base = built(cfg)
    trainer = GuidedDistillationTrainer(cfg, base.student, BrightRegionTeacher(), base.streams, base.run,
                                        base.device, base.info)
    original = bright_cells(torch.from_numpy(image).permute(2, 0, 1))
    aligned, unaugmented = [], []
    for seed in range(8):
        dataset.reseed(seed)
        batch = collate([dataset[0]])
        (pseudo,) = trainer.make_pseudo_labels(batch)
        assert len(pseudo) == 1 and pseudo.image_size == (16, 16)
        aligned.append(iou(pseudo.masks[0], bright_cells(batch.strong[0])))
        unaugmented.append(iou(pseudo.masks[0], original))
    assert min(aligned) > 0.8, aligned
    assert sum(unaugmented) / len(unaugmented) < 0.6, unaugmented  # the views really moved the object


def test_score_weighted_unlabeled_loss_uses_the_mean_pseudo_label_confidence():
    from semiseg.semi.guided import unsupervised_weight
    from semiseg.structures import Instances

    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    batch = [Instances.from_masks(torch.tensor([0, 1]), masks, scores=torch.tensor([0.9, 0.7])),
             Instances.from_masks(torch.tensor([2]), masks[:1], scores=torch.tensor([0.8])),
             replace(Instances.empty(4, 4), scores=torch.zeros(0))]
    assert unsupervised_weight(batch, 2.0, score_weighted=False) == 2.0
    assert unsupervised_weight(batch, 2.0, score_weighted=True) == pytest.approx(2.0 * 0.8)
    assert unsupervised_weight([Instances.empty(4, 4)], 2.0, score_weighted=True) == 2.0


def test_unreadable_unlabeled_images_in_loader_workers_are_counted(data, tmp_path):
    unlabeled = json.loads(data["unlabeled"].read_text())
    images = tmp_path / "images"
    images.mkdir()
    for i, entry in enumerate(unlabeled["images"]):
        source = (data["train_images"] / entry["file_name"]).read_bytes()
        (images / entry["file_name"]).write_bytes(source[:50] if i % 2 else source)  # every other one truncated
    run = train(gd_config(data, tmp_path / "run", "solver.max_iter=3", "semi.burn_in_iter=100",
                          "data.num_workers=1", f"data.unlabeled_images={images}"))
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["skipped_images_unlabeled"] >= 1 and last["skipped_images_labeled"] == 0
    assert "unreadable unlabeled image(s) skipped so far" in (run / "log.txt").read_text()


def test_unsup_class_and_mask_weights_scale_only_their_unlabeled_terms(data, tmp_path):
    def first_losses(*overrides):
        trainer = built(gd_config(data, tmp_path / f"run{len(overrides)}", "semi.burn_in_iter=100",
                                  "semi.unsup_loss_weight=1.0", *overrides))
        torch.manual_seed(0)
        return {k: float(v.detach()) for k, v in trainer.forward_losses().items()}

    plain, scaled = first_losses(), first_losses("semi.unsup_class_weight=0.25", "semi.unsup_mask_weight=0.5")
    assert plain.keys() == scaled.keys()
    for prefix in ("loss_ce", "loss_mask", "loss_dice"):
        assert any(k.startswith(prefix) and k.endswith("_unsup") for k in plain), prefix
    for name in plain:
        factor = 1.0
        if name.endswith("_unsup"):
            factor = 0.25 if name.startswith("loss_ce") else 0.5 if name.startswith(("loss_mask", "loss_dice")) else 1.0
        assert scaled[name] == pytest.approx(factor * plain[name], rel=1e-5), name
