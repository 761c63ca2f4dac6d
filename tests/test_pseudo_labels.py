"""The pseudo-label filter on hand-made teacher outputs."""
import pytest
import torch

from semiseg.errors import ConfigError
from semiseg.models.protocol import PseudoLabelCandidates
from semiseg.semi.pseudo_labels import ThresholdFilter

NUM_CLASSES = 3
BIG = 8.0  # a mask logit that is "surely inside" (sigmoid ~ 0.9997)


def _candidates(queries: list[tuple[int, float, tuple[slice, slice]]], size: int = 8) -> PseudoLabelCandidates:
    """One image; each query = (argmax class, confidence, mask region). Class NUM_CLASSES = no object."""
    q = len(queries)
    full = torch.zeros(1, q, NUM_CLASSES + 1)
    mask_logits = torch.full((1, q, size, size), -BIG)
    for i, (cls, conf, region) in enumerate(queries):
        # K+1 class probabilities whose top class `cls` has probability `conf`, the rest spread evenly
        probs = torch.full((NUM_CLASSES + 1,), (1.0 - conf) / NUM_CLASSES)
        probs[cls] = conf
        full[0, i] = probs
        mask_logits[0, i][region] = BIG
    return PseudoLabelCandidates(class_probs=full[..., :-1], is_object=full.argmax(-1) != NUM_CLASSES,
                                 mask_logits=mask_logits, boxes=None)


def test_reference_rules_keep_confident_large_objects_only():
    everything = (slice(None), slice(None))
    candidates = _candidates([
        (1, 0.9, (slice(1, 4), slice(2, 6))),  # kept: object, confident, area 12
        (NUM_CLASSES, 0.95, everything),        # dropped: argmax is "no object"
        (2, 0.6, everything),                   # dropped: not confident enough
        (0, 0.9, (slice(0, 2), slice(0, 2))),   # dropped: soft area 4 <= 5
        (0, 0.8, (slice(5, 8), slice(0, 2))),   # kept: area 6
    ])
    (pl,) = ThresholdFilter()(candidates, [(32, 32)])
    assert pl.labels.tolist() == [1, 0]
    assert pl.image_size == (8, 8) and pl.masks.dtype == torch.bool
    assert pl.masks[0].sum() == 12 and pl.masks[0, 1:4, 2:6].all()
    assert pl.masks[1].sum() == 6 and pl.masks[1, 5:8, 0:2].all()
    assert pl.boxes.tolist() == [[2.0, 1.0, 6.0, 4.0], [0.0, 5.0, 2.0, 8.0]]
    torch.testing.assert_close(pl.scores, torch.tensor([0.9, 0.8]))


def test_threshold_is_strict_and_per_class_thresholds_override_it():
    region = (slice(0, 4), slice(0, 4))
    candidates = _candidates([(0, 0.7, region), (1, 0.6, region), (2, 0.9, region)])
    assert ThresholdFilter()(candidates, [(32, 32)])[0].labels.tolist() == [2]
    per_class = ThresholdFilter(class_thresholds=(0.65, 0.5, 0.95))
    assert per_class(candidates, [(32, 32)])[0].labels.tolist() == [0, 1]


def test_decoupled_mask_threshold_and_area():
    candidates = _candidates([(0, 0.9, (slice(0, 4), slice(0, 4)))])
    candidates.mask_logits[0, 0, 0, :4] = 0.5  # sigmoid 0.62: inside at 0.5, outside at 0.7
    assert ThresholdFilter()(candidates, [(32, 32)])[0].masks.sum() == 16
    assert ThresholdFilter(mask_threshold=0.7)(candidates, [(32, 32)])[0].masks.sum() == 12
    assert len(ThresholdFilter(min_area=16.0)(candidates, [(32, 32)])[0]) == 0


def test_padding_is_cleared_before_the_area_test():
    # image of 12 x 20 pixels in a 32 x 32 canvas -> valid mask area 3 x 5 at stride 4
    candidates = _candidates([(0, 0.9, (slice(None), slice(None))), (1, 0.9, (slice(4, 8), slice(6, 8)))])
    (pl,) = ThresholdFilter()(candidates, [(12, 20)])
    assert pl.labels.tolist() == [0]  # the second query lies entirely in the padding
    assert pl.masks[0].sum() == 15 and pl.masks[0, :3, :5].all()
    assert pl.boxes.tolist() == [[0.0, 0.0, 5.0, 3.0]]


def test_batch_of_images_and_empty_results():
    a = _candidates([(0, 0.9, (slice(0, 4), slice(0, 4)))])
    b = _candidates([(1, 0.5, (slice(0, 4), slice(0, 4)))])
    both = PseudoLabelCandidates(class_probs=torch.cat([a.class_probs, b.class_probs]),
                                 is_object=torch.cat([a.is_object, b.is_object]),
                                 mask_logits=torch.cat([a.mask_logits, b.mask_logits]), boxes=None)
    first, second = ThresholdFilter()(both, [(32, 32), (32, 32)])
    assert first.labels.tolist() == [0]
    assert len(second) == 0 and second.masks.shape == (0, 8, 8) and second.boxes.shape == (0, 4)


def test_bad_settings_are_user_errors():
    candidates = _candidates([(0, 0.9, (slice(0, 4), slice(0, 4)))])
    with pytest.raises(ConfigError, match="class_thresholds has 2 values but the model has 3 classes"):
        ThresholdFilter(class_thresholds=(0.5, 0.5))(candidates, [(32, 32)])


def _with_boxes(candidates: PseudoLabelCandidates, boxes: list[list[float]]) -> PseudoLabelCandidates:
    """The same candidates with box-head boxes [Q, 4] (xyxy pixels of the mask canvas)."""
    return PseudoLabelCandidates(candidates.class_probs, candidates.is_object, candidates.mask_logits,
                                 boxes=torch.tensor([boxes]))


def test_box_source_head_takes_the_box_head_boxes_clipped_to_the_image():
    candidates = _with_boxes(_candidates([(0, 0.9, (slice(1, 4), slice(2, 6))), (1, 0.9, (slice(0, 3), slice(0, 3)))]),
                             [[1.5, 0.5, 6.5, 4.5], [-2.0, -1.0, 7.0, 9.0]])
    (from_mask,) = ThresholdFilter()(candidates, [(32, 24)])
    assert from_mask.boxes.tolist() == [[2.0, 1.0, 6.0, 4.0], [0.0, 0.0, 3.0, 3.0]]
    (from_head,) = ThresholdFilter(box_source="head")(candidates, [(32, 24)])  # valid area 8 x 6 at stride 4
    assert from_head.boxes.tolist() == [[1.5, 0.5, 6.0, 4.5], [0.0, 0.0, 6.0, 8.0]]
    assert torch.equal(from_head.masks, from_mask.masks) and from_head.labels.tolist() == [0, 1]


def test_box_source_head_without_a_box_head_is_a_config_error():
    candidates = _candidates([(0, 0.9, (slice(0, 4), slice(0, 4)))])
    with pytest.raises(ConfigError, match="box_source=head needs a model with a box head"):
        ThresholdFilter(box_source="head")(candidates, [(32, 32)])


def test_mask_nms_keeps_one_of_two_near_identical_masks_and_both_disjoint_ones():
    candidates = _candidates([
        (0, 0.8, (slice(0, 4), slice(0, 4))),   # duplicate of the next one (IoU 12 / 16), less confident
        (1, 0.9, (slice(0, 4), slice(0, 3))),   # kept: the most confident
        (2, 0.85, (slice(5, 8), slice(5, 8))),  # kept: disjoint from both
    ])
    (pl,) = ThresholdFilter(nms_iou=0.5)(candidates, [(32, 32)])
    assert pl.labels.tolist() == [1, 2]  # query order preserved
    torch.testing.assert_close(pl.scores, torch.tensor([0.9, 0.85]))
    assert pl.boxes.tolist() == [[0.0, 0.0, 3.0, 4.0], [5.0, 5.0, 8.0, 8.0]]
    assert ThresholdFilter()(candidates, [(32, 32)])[0].labels.tolist() == [0, 1, 2]  # nms_iou 1.0: off
    assert ThresholdFilter(nms_iou=0.8)(candidates, [(32, 32)])[0].labels.tolist() == [0, 1, 2]  # 0.75 <= 0.8


def test_mask_nms_is_greedy_a_suppressed_mask_suppresses_nothing():
    from semiseg.semi.pseudo_labels import mask_nms

    masks = torch.zeros(4, 1, 10, dtype=torch.bool)
    masks[0, 0, 0:4] = True  # a: best score
    masks[1, 0, 1:5] = True  # b: IoU(a, b) = 3/5, suppressed by a
    masks[2, 0, 2:6] = True  # c: IoU(a, c) = 2/6, IoU(b, c) = 3/5 -> kept, since b is gone
    masks[3, 0, 8:10] = True  # d: disjoint
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert mask_nms(masks, scores, 0.5).tolist() == [True, False, True, True]
    shuffled = torch.tensor([2, 0, 3, 1])
    assert mask_nms(masks[shuffled], scores[shuffled], 0.5).tolist() == [True, True, True, False]
    assert mask_nms(masks[:0], scores[:0], 0.5).shape == (0,)


def test_pseudo_label_boxes_normalise_like_the_equivalent_ground_truth():
    """A ground-truth rectangle on the 64 x 64 padded canvas and the teacher's quarter-resolution
    pseudo-label of it (mask-derived, or the same box from the box head) give the student's box loss
    and denoising the same normalised cxcywh box."""
    from semiseg.models.box_ops import normalized_cxcywh
    from semiseg.structures import Instances

    gt_mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    gt_mask[0, 8:28, 4:32] = True  # x 4..32, y 8..28 (edges on the 4-pixel grid)
    gt = Instances.from_masks(torch.tensor([1]), gt_mask)
    candidates = _with_boxes(_candidates([(1, 0.9, (slice(2, 7), slice(1, 8)))], size=16), [[1.0, 2.0, 8.0, 7.0]])
    expected = normalized_cxcywh(gt.boxes, gt.image_size)
    torch.testing.assert_close(expected, torch.tensor([[18 / 64, 18 / 64, 28 / 64, 20 / 64]]))
    for box_source in ("mask", "head"):
        (pl,) = ThresholdFilter(box_source=box_source)(candidates, [(64, 64)])
        torch.testing.assert_close(normalized_cxcywh(pl.boxes, pl.image_size), expected)


def test_threshold_and_nms_defaults_come_from_the_model():
    from semiseg.config import Config, apply_overrides
    from semiseg.models.mask2former import Mask2Former
    from semiseg.models.maskdino import MaskDINO

    mask2former = apply_overrides(Config(), []).semi.pseudo_labels.build_filter(Mask2Former.pseudo_label_defaults)
    assert (mask2former.score_threshold, mask2former.nms_iou) == (0.7, 1.0)  # the reference
    maskdino = apply_overrides(Config(), []).semi.pseudo_labels.build_filter(MaskDINO.pseudo_label_defaults)
    assert (maskdino.score_threshold, maskdino.nms_iou) == (0.3, 0.5)  # calibrated sigmoid scores
    chosen = apply_overrides(Config(), ["semi.pseudo_labels.score_threshold=0.45", "semi.pseudo_labels.nms_iou=1.0"])
    explicit = chosen.semi.pseudo_labels.build_filter(MaskDINO.pseudo_label_defaults)
    assert (explicit.score_threshold, explicit.nms_iou) == (0.45, 1.0)
    with pytest.raises(ConfigError, match="nms_iou"):
        apply_overrides(Config(), ["semi.pseudo_labels.nms_iou=1.5"])


def _disc_logits(center: tuple[float, float], radius: float, size: int, stride: int) -> torch.Tensor:
    """[size, size] logits at 1/stride resolution: the signed distance (input pixels) to a disc, sampled at
    each mask pixel's centre in input coordinates."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) * stride
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    return radius - ((yy - center[0]) ** 2 + (xx - center[1]) ** 2).sqrt()


def test_mask_upsampling_outlines_a_small_object_at_the_input_resolution():
    """A disc of diameter 12 input pixels (3 mask pixels at stride 4): binarised at 1/4 resolution its
    pseudo-mask is a blocky cross; binarised after bilinear upsampling it follows the disc."""
    size, stride, center, radius = 16, 4, (29.0, 35.0), 6.0
    logits = _disc_logits(center, radius, size, stride)
    candidates = _candidates([(0, 0.9, (slice(0, 1), slice(0, 1)))], size=size)
    candidates.mask_logits[0, 0] = logits
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    disc = (yy - center[0]) ** 2 + (xx - center[1]) ** 2 < radius ** 2  # [64, 64]

    def iou(mask: torch.Tensor) -> float:
        return float((mask & disc).sum() / (mask | disc).sum())

    (quarter,) = ThresholdFilter(min_area=0.0)(candidates, [(64, 64)])
    (full,) = ThresholdFilter(min_area=0.0, mask_upsampling=4)(candidates, [(64, 64)])
    assert quarter.image_size == (16, 16) and full.image_size == (64, 64)
    nearest = quarter.masks[0].repeat_interleave(4, 0).repeat_interleave(4, 1)  # how the quarter mask covers the input
    assert iou(nearest) < 0.75 < 0.9 < iou(full.masks[0])


def test_mask_upsampling_keeps_the_area_test_boxes_and_padding_in_their_units():
    # the image is 12 x 20 input pixels of a 32 x 32 canvas: 3 x 5 mask pixels, 12 x 20 after upsampling
    candidates = _with_boxes(_candidates([(0, 0.9, (slice(None), slice(None))), (1, 0.9, (slice(0, 2), slice(0, 2)))]),
                             [[0.5, 0.5, 9.0, 9.0], [0.0, 0.0, 2.0, 2.0]])
    (quarter,) = ThresholdFilter(box_source="head")(candidates, [(12, 20)])
    (full,) = ThresholdFilter(box_source="head", mask_upsampling=4)(candidates, [(12, 20)])
    assert full.labels.tolist() == quarter.labels.tolist() == [0]  # the 2 x 2 query fails the area test (4 <= 5) in both
    assert full.image_size == (32, 32) and full.masks[0].sum() == 12 * 20 and full.masks[0, :12, :20].all()
    assert full.boxes.tolist() == [[2.0, 2.0, 20.0, 12.0]] and quarter.boxes.tolist() == [[0.5, 0.5, 5.0, 3.0]]
    (from_mask,) = ThresholdFilter(mask_upsampling=4)(candidates, [(12, 20)])
    assert from_mask.boxes.tolist() == [[0.0, 0.0, 20.0, 12.0]]
    (none,) = ThresholdFilter(score_threshold=0.95, mask_upsampling=4)(candidates, [(12, 20)])
    assert none.masks.shape == (0, 32, 32) and none.boxes.shape == (0, 4)
    with pytest.raises(ConfigError, match="mask_upsampling=0"):
        from semiseg.config import Config, apply_overrides
        apply_overrides(Config(), ["semi.pseudo_labels.mask_upsampling=0"])
