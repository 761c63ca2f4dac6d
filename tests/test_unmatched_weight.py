"""`unmatched_weight`: the classification loss of queries that no target matched, scaled (Guided
Distillation's unlabeled images), checked by hand for both criteria; and its config value."""
import pytest
import torch
import torch.nn.functional as F

from semiseg.config import Config, apply_overrides
from semiseg.errors import ConfigError
from semiseg.models.mask2former_criterion import SetCriterion
from semiseg.models.maskdino_criterion import MaskDINOCriterion
from semiseg.models.matcher import HungarianMatcher
from semiseg.structures import Instances

ALPHA, GAMMA = 0.25, 2.0


def two_images() -> tuple[list[Instances], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Image 0: queries 1 and 3 matched to classes 2 and 0; image 1: query 0 matched to class 1."""
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = masks[1, 4:, 4:] = True
    targets = [Instances.from_masks(torch.tensor([0, 2]), masks), Instances.from_masks(torch.tensor([1]), masks[:1])]
    indices = [(torch.tensor([1, 3]), torch.tensor([1, 0])), (torch.tensor([0]), torch.tensor([0]))]
    return targets, indices


def focal_by_hand(logits: torch.Tensor, target_row: torch.Tensor) -> torch.Tensor:
    """One query: sum over classes of the focal loss against a one-hot (or all-zero) row."""
    p = logits.sigmoid()
    positive = -ALPHA * (1 - p) ** GAMMA * torch.log(p)
    negative = -(1 - ALPHA) * p ** GAMMA * torch.log(1 - p)
    return torch.where(target_row.bool(), positive, negative).sum()


@pytest.mark.parametrize("weight", [1.0, 0.1, 0.0])
def test_maskdino_focal_scales_only_the_rows_of_unmatched_queries(weight):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, dtype=torch.float64)
    targets, indices = two_images()
    criterion = MaskDINOCriterion(3, HungarianMatcher(), focal_alpha=ALPHA, focal_gamma=GAMMA)
    got = criterion.loss_focal(logits, targets, indices, num_masks=1.5, unmatched_weight=weight)
    matched = {(0, 1): 2, (0, 3): 0, (1, 0): 1}
    expected = 0.0
    for b in range(2):
        for q in range(4):
            row = torch.zeros(3)
            if (b, q) in matched:
                row[matched[(b, q)]] = 1
            expected += focal_by_hand(logits[b, q], row) * (1.0 if (b, q) in matched else weight)
    assert got.item() == pytest.approx(expected.item() / 1.5, rel=1e-6)


def test_mask2former_cross_entropy_scales_the_no_object_weight():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4)
    targets, indices = two_images()
    criterion = SetCriterion(3, HungarianMatcher(), no_object_weight=0.1)
    got = criterion.loss_labels(logits, targets, indices, unmatched_weight=0.5)
    classes = torch.tensor([[3, 2, 3, 0], [1, 3, 3, 3]])  # 3 = "no object"
    per_query = F.cross_entropy(logits.reshape(8, 4), classes.reshape(8), reduction="none")
    weights = torch.where(classes.reshape(8) == 3, 0.1 * 0.5, 1.0)
    assert got.item() == pytest.approx(((per_query * weights).sum() / weights.sum()).item(), rel=1e-6)
    assert torch.equal(criterion.loss_labels(logits, targets, indices), criterion.loss_labels(logits, targets, indices, 1.0))


def test_unmatched_weight_defaults_to_the_reference_and_rejects_negative_values():
    assert Config().semi.unmatched_weight == 1.0
    assert apply_overrides(Config(), ["semi.unmatched_weight=0.25"]).semi.unmatched_weight == 0.25
    with pytest.raises(ConfigError, match="unmatched_weight=-1"):
        apply_overrides(Config(), ["semi.unmatched_weight=-1"])
