"""`semi.pseudo_labels.class_targets: soft`: the teacher's class probabilities as targets, checked by
hand for both criteria; the filter attaches them; one-hot `class_probs` equal hard labels."""
import pytest
import torch
import torch.nn.functional as F

from semiseg.config import Config, apply_overrides
from semiseg.errors import ConfigError
from semiseg.models.mask2former_criterion import SetCriterion
from semiseg.models.maskdino_criterion import MaskDINOCriterion
from semiseg.models.matcher import HungarianMatcher
from semiseg.models.protocol import PseudoLabelCandidates, PseudoLabelDefaults
from semiseg.structures import Instances
from test_unmatched_weight import ALPHA, GAMMA, two_images

PROBS = [torch.tensor([[0.1, 0.3, 0.4], [0.6, 0.2, 0.0]]), torch.tensor([[0.2, 0.7, 0.1]])]  # per target


def with_probs(targets: list[Instances], probs: list[torch.Tensor]) -> list[Instances]:
    return [Instances(t.labels, t.masks, t.boxes, class_probs=p) for t, p in zip(targets, probs)]


def test_mask2former_soft_cross_entropy_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4, dtype=torch.float64)
    targets, indices = two_images()
    criterion = SetCriterion(3, HungarianMatcher(), no_object_weight=0.1)
    got = criterion.loss_labels(logits, with_probs(targets, PROBS), indices)
    # query -> its target distribution over K+1 (image 0: query 1 <- target 1, query 3 <- target 0)
    rows = {(0, 1): PROBS[0][1], (0, 3): PROBS[0][0], (1, 0): PROBS[1][0]}
    weights = torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64)
    numerator = denominator = 0.0
    for b in range(2):
        for q in range(4):
            row = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
            if (b, q) in rows:
                row = torch.cat([rows[(b, q)] / rows[(b, q)].sum(), torch.zeros(1)]).double()
            numerator += -(weights * row * logits[b, q].log_softmax(-1)).sum()
            denominator += (weights * row).sum()
    assert got.item() == pytest.approx((numerator / denominator).item(), rel=1e-6)


def test_one_hot_class_probs_equal_hard_labels_for_both_criteria():
    torch.manual_seed(0)
    targets, indices = two_images()
    one_hot = with_probs(targets, [F.one_hot(t.labels, 3).float() for t in targets])
    m2f = SetCriterion(3, HungarianMatcher(), no_object_weight=0.1)
    logits = torch.randn(2, 4, 4)
    assert m2f.loss_labels(logits, one_hot, indices).item() == pytest.approx(
        m2f.loss_labels(logits, targets, indices).item(), rel=1e-6)
    dino = MaskDINOCriterion(3, HungarianMatcher(), focal_alpha=ALPHA, focal_gamma=GAMMA)
    logits = torch.randn(2, 4, 3)
    for weight in (1.0, 0.25):
        assert dino.loss_focal(logits, one_hot, indices, 1.5, weight).item() == pytest.approx(
            dino.loss_focal(logits, targets, indices, 1.5, weight).item(), rel=1e-6)


def test_maskdino_focal_takes_the_probabilities_as_rows():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, dtype=torch.float64)
    targets, indices = two_images()
    criterion = MaskDINOCriterion(3, HungarianMatcher(), focal_alpha=ALPHA, focal_gamma=GAMMA)
    got = criterion.loss_focal(logits, with_probs(targets, PROBS), indices, num_masks=2.0, unmatched_weight=0.5)
    rows = {(0, 1): PROBS[0][1], (0, 3): PROBS[0][0], (1, 0): PROBS[1][0]}
    expected = 0.0
    for b in range(2):
        for q in range(4):
            t = rows.get((b, q), torch.zeros(3)).double()
            p = logits[b, q].sigmoid()
            p_t = p * t + (1 - p) * (1 - t)
            bce = -(t * p.log() + (1 - t) * (1 - p).log())
            loss = (ALPHA * t + (1 - ALPHA) * (1 - t)) * (1 - p_t) ** GAMMA * bce
            expected += loss.sum() * (1.0 if (b, q) in rows else 0.5)
    assert got.item() == pytest.approx(expected.item() / 2.0, rel=1e-6)


def test_the_filter_attaches_the_teacher_probabilities_only_when_asked():
    probs = torch.tensor([[[0.8, 0.1, 0.05], [0.2, 0.3, 0.1]]])  # [1, 2, 3]: query 0 passes 0.7
    mask_logits = torch.full((1, 2, 8, 8), 5.0)
    candidates = PseudoLabelCandidates(class_probs=probs, is_object=torch.ones(1, 2, dtype=torch.bool),
                                       mask_logits=mask_logits, boxes=None)
    defaults = PseudoLabelDefaults(score_threshold=0.7, nms_iou=1.0)
    hard = Config().semi.pseudo_labels.build_filter(defaults)(candidates, [(32, 32)])[0]
    assert hard.class_probs is None and hard.labels.tolist() == [0]
    soft_cfg = apply_overrides(Config(), ["semi.pseudo_labels.class_targets=soft"]).semi.pseudo_labels
    (soft,) = soft_cfg.build_filter(defaults)(candidates, [(32, 32)])
    assert soft.labels.tolist() == [0] and torch.equal(soft.class_probs, probs[0, :1])
    assert torch.equal(soft[torch.tensor([0])].class_probs, soft.class_probs)


def test_class_targets_must_be_hard_or_soft():
    with pytest.raises(ConfigError, match="class_targets"):
        apply_overrides(Config(), ["semi.pseudo_labels.class_targets=fuzzy"])
