"""`semi.pseudo_labels.ignore_threshold`: uncertain pseudo-objects are matched but give their query no
loss. The filter flags them; both criteria leave the matched query out of every term (checked by hand
and by perturbing that query); Mask DINO builds no denoising queries for them; the config and the
Guided Distillation step wire it through."""
import pytest
import torch
import torch.nn.functional as F
from dataclasses import replace

from semiseg.config import Config, apply_overrides
from semiseg.errors import ConfigError
from semiseg.models.mask2former_criterion import SetCriterion, average_num_masks, split_ignored
from semiseg.models.maskdino_criterion import MaskDINOCriterion
from semiseg.models.protocol import PseudoLabelDefaults
from semiseg.semi.pseudo_labels import ThresholdFilter
from gd_helpers import built, gd_config
from maskdino_helpers import tiny_model
from test_pseudo_labels import NUM_CLASSES, _candidates
from test_unmatched_weight import ALPHA, GAMMA, focal_by_hand, two_images


def with_ignored(targets, flags):
    return [replace(t, ignore=torch.tensor(f)) for t, f in zip(targets, flags)]


IGNORED = [[True, False], [False]]  # image 0: target 0 (class 0, matched to query 3) is uncertain


def test_filter_flags_the_queries_between_the_two_thresholds():
    region = (slice(0, 4), slice(0, 4))
    other = (slice(4, 8), slice(4, 8))
    candidates = _candidates([
        (1, 0.9, region),            # confident
        (2, 0.5, other),             # uncertain: ignored
        (0, 0.2, other),             # below the ignore threshold: dropped
        (NUM_CLASSES, 0.6, other),   # "no object" wins (below: its top class 0.35): dropped
        (0, 0.45, (slice(0, 4), slice(0, 3))),  # uncertain duplicate of the confident one: NMS drops it
    ])
    candidates.class_probs[0, 3] = torch.tensor([0.35, 0.03, 0.02])  # above the ignore threshold, not an object
    (pl,) = ThresholdFilter(ignore_threshold=0.3, nms_iou=0.5)(candidates, [(32, 32)])
    assert pl.labels.tolist() == [1, 2] and pl.ignore.tolist() == [False, True]
    assert pl.num_targets == 1 and pl.confident().labels.tolist() == [1] and pl.confident().ignore is None
    (reference,) = ThresholdFilter(nms_iou=0.5)(candidates, [(32, 32)])
    assert reference.labels.tolist() == [1] and reference.ignore is None


def test_split_ignored_and_num_masks_leave_the_ignored_targets_out():
    targets, indices = two_images()
    targets = with_ignored(targets, IGNORED)
    kept, ignored = split_ignored(targets, indices)
    assert [(s.tolist(), t.tolist()) for s, t in kept] == [([1], [1]), ([0], [0])]
    assert [q.tolist() for q in ignored] == [[3], []]
    assert average_num_masks(targets, torch.device("cpu")) == 2.0
    assert [len(t[torch.tensor([0])]) for t in targets] == [1, 1] and targets[0][torch.tensor([0])].ignore.tolist() == [True]


def test_mask2former_cross_entropy_leaves_the_ignored_queries_out():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4, dtype=torch.float64)
    targets, indices = two_images()
    kept, ignored = split_ignored(with_ignored(targets, IGNORED), indices)
    criterion = SetCriterion(3, lambda outputs, targets: indices, no_object_weight=0.1)
    got = criterion.loss_labels(logits, targets, kept, ignored=ignored)
    classes = torch.tensor([[3, 2, 3, 0], [1, 3, 3, 3]]).reshape(8)  # 3 = "no object"
    per_query = F.cross_entropy(logits.reshape(8, 4), classes, reduction="none")
    weights = torch.where(classes == 3, 0.1, 1.0).double()
    weights[3] = 0.0  # image 0, query 3
    assert got.item() == pytest.approx(((per_query * weights).sum() / weights.sum()).item(), rel=1e-6)
    soft = [replace(t, class_probs=F.one_hot(t.labels, 3).float()) for t in targets]  # the soft path agrees
    assert criterion.loss_labels(logits, soft, kept, ignored=ignored).item() == pytest.approx(got.item(), rel=1e-6)


def test_maskdino_focal_gives_the_ignored_rows_no_weight():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, dtype=torch.float64)
    targets, indices = two_images()
    kept, ignored = split_ignored(with_ignored(targets, IGNORED), indices)
    criterion = MaskDINOCriterion(3, lambda outputs, targets: indices, focal_alpha=ALPHA, focal_gamma=GAMMA)
    got = criterion.loss_focal(logits, targets, kept, num_masks=2.0, ignored=ignored)
    rows = {(0, 1): 2, (1, 0): 1}
    expected = sum(focal_by_hand(logits[b, q], F.one_hot(torch.tensor(rows[(b, q)]), 3) if (b, q) in rows
                                 else torch.zeros(3))
                   for b in range(2) for q in range(4) if (b, q) != (0, 3))
    assert got.item() == pytest.approx(expected.item() / 2.0, rel=1e-6)


def _outputs(queries: int = 4, size: int = 8, boxes: bool = False) -> dict:
    torch.manual_seed(1)
    out = {"pred_logits": torch.randn(2, queries, 4 if not boxes else 3),
           "pred_masks": torch.randn(2, queries, size, size)}
    if boxes:
        out["pred_boxes"] = torch.rand(2, queries, 4) * 0.5 + 0.25
    return out


@pytest.mark.parametrize("arch", ["mask2former", "maskdino"])
def test_the_query_matched_to_an_ignored_target_gets_no_loss_in_any_term(arch):
    targets, indices = two_images()
    targets = with_ignored(targets, IGNORED)
    fixed = lambda outputs, targets, **kwargs: indices  # noqa: E731 - the same assignment for both runs
    if arch == "mask2former":
        criterion = SetCriterion(3, fixed, num_points=16)
    else:
        criterion = MaskDINOCriterion(3, fixed, num_points=16, dn="no")
    outputs = _outputs(boxes=arch == "maskdino")
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    torch.manual_seed(2)
    losses = criterion(outputs, targets)
    sum(losses.values()).backward()
    for name, tensor in outputs.items():
        assert tensor.grad[0, 3].abs().max() == 0, name  # image 0, query 3: matched to the ignored target
        assert tensor.grad[0, 1].abs().max() > 0, name  # image 0, query 1: matched to a kept target
    without = [t.confident() for t in targets]  # the same losses as the kept targets alone, query 3 then unmatched
    kept_indices = [(torch.tensor([1]), torch.tensor([0])), indices[1]]
    criterion.matcher = lambda outputs, targets, **kwargs: kept_indices
    torch.manual_seed(2)
    plain = criterion({k: v.detach() for k, v in outputs.items()}, without)
    for name in ("loss_mask", "loss_dice", "loss_bbox", "loss_giou"):
        if name in losses:
            assert losses[name].item() == pytest.approx(plain[name].item(), rel=1e-6), name


def test_maskdino_builds_no_denoising_queries_for_ignored_targets():
    model = tiny_model()
    targets, _ = two_images()
    flagged = with_ignored(targets, IGNORED)
    torch.manual_seed(0)
    with_flags = model.denoising_queries(flagged)
    torch.manual_seed(0)
    confident = model.denoising_queries([t.confident() for t in flagged])
    assert with_flags.group_size == 1  # one object per image once the ignored one is left out
    for name in ("content", "anchors", "attn_mask"):
        torch.testing.assert_close(getattr(with_flags, name), getattr(confident, name))


def test_ignore_threshold_config():
    assert Config().semi.pseudo_labels.ignore_threshold is None
    cfg = apply_overrides(Config(), ["semi.pseudo_labels.ignore_threshold=0.35"])
    assert cfg.semi.pseudo_labels.build_filter(PseudoLabelDefaults(0.7, 1.0)).ignore_threshold == 0.35
    with pytest.raises(ConfigError, match="ignore_threshold=0.8: expected a value below"):
        apply_overrides(Config(), ["semi.pseudo_labels.ignore_threshold=0.8"]).semi.pseudo_labels.build_filter(
            PseudoLabelDefaults(0.7, 1.0))
    with pytest.raises(ConfigError, match="ignore_threshold=1.5"):
        apply_overrides(Config(), ["semi.pseudo_labels.ignore_threshold=1.5"])


def test_guided_step_with_only_uncertain_pseudo_objects_learns_no_unlabeled_masks(data, tmp_path):
    trainer = built(gd_config(data, tmp_path / "run", "semi.burn_in_iter=100", "semi.unsup_loss_weight=1.0",
                              "semi.pseudo_labels.score_threshold=0.999", "semi.pseudo_labels.ignore_threshold=0.0"))
    torch.manual_seed(0)
    losses = trainer.forward_losses()
    assert trainer.ignored_count > 0 and trainer.pseudo_label_count == 0
    unsup_masks = [v for k, v in losses.items() if k.startswith(("loss_mask", "loss_dice")) and k.endswith("_unsup")]
    assert unsup_masks and all(v.item() == 0.0 for v in unsup_masks)
    assert all(torch.isfinite(v) for v in losses.values())
