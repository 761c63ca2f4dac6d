import colorsys

import numpy as np
import pytest
import torch

from semiseg.data.transforms import (AugmentationConfig, AugmentationPipeline, ColorAugSSD, FixedSizeCrop,
                                     RandomCrop, RandomFlip, ResizeScale, ResizeShortestEdge, StrongAugmentation,
                                     build_test_transform, build_train_transform, scale_saturation)
from semiseg.errors import ConfigError
from semiseg.structures import masks_to_boxes

H, W = 64, 96
PALETTE = torch.tensor([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20], [20, 230, 230]],
                       dtype=torch.uint8)


def painted_scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A black 64x96 image whose instance k (label k) is painted with PALETTE[k]; one instance in a corner."""
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    masks = torch.stack([
        (yy >= 4) & (yy < 30) & (xx >= 6) & (xx < 40),                 # rectangle, top-left
        (yy - 40) ** 2 + (xx - 60) ** 2 < 14 ** 2,                      # disk
        (yy >= 36) & (yy < 60) & (xx >= 8) & (xx < 20),                 # tall bar, bottom-left
        (yy >= 2) & (yy < 20) & (xx >= 70) & (xx < 92) & (xx - 70 > yy - 2),  # triangle, top-right
        (yy >= 58) & (xx >= 90),                                        # small corner block
    ])
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    for k, mask in enumerate(masks):
        image[:, mask] = PALETTE[k][:, None]
    return image, masks, torch.arange(len(masks))


def dilate(masks: torch.Tensor) -> torch.Tensor:
    """[N, H, W] bool grown by one pixel (3x3)."""
    return torch.nn.functional.max_pool2d(masks[None].float(), 3, stride=1, padding=1)[0].bool()


def assert_aligned(image: torch.Tensor, instances) -> int:
    """Within one pixel (resampling blends the boundary): the interior of each mask has the instance's
    colour, and the pixels of that colour lie in the mask grown by one pixel."""
    checked = 0
    pixels = image.permute(1, 2, 0).float()  # [H, W, 3]
    for label, mask in zip(instances.labels, instances.masks):
        interior = ~dilate(~mask[None])[0]
        if interior.sum() < 20:
            continue
        distance = (pixels - PALETTE[label].float()).norm(dim=-1)
        assert (distance[interior] < 60).float().mean() > 0.97
        assert dilate(mask[None])[0][distance < 30].all()
        checked += 1
    return checked


GEOMETRIC_PIPELINES = {
    "flip": [RandomFlip(p=1.0)],
    "resize_scale": [ResizeScale(0.3, 2.0, 64, 64)],
    "fixed_size_crop": [FixedSizeCrop(48, 48)],
    "resize_shortest_edge": [ResizeShortestEdge([40, 80, 100], 200)],
    "random_crop": [RandomCrop(40, 50)],
    "lsj": build_train_transform("lsj", 64, min_scale=0.5, max_scale=2.0).steps,
    "resize_crop": build_train_transform("resize_crop", (40, 64), short_edges=[48, 64, 96], color=False).steps,
}


@pytest.mark.parametrize("name", GEOMETRIC_PIPELINES)
def test_image_and_masks_stay_aligned_and_boxes_follow_masks(name):
    pipeline = AugmentationPipeline(GEOMETRIC_PIPELINES[name])
    image, masks, labels = painted_scene()
    checked = 0
    for seed in range(6):
        out, instances = pipeline(image, masks, labels, np.random.default_rng(seed))
        assert out.dtype == torch.uint8 and out.shape[0] == 3
        assert instances.image_size == tuple(out.shape[-2:])
        assert instances.masks.flatten(1).any(dim=1).all(), "empty instances must be dropped"
        assert torch.equal(instances.boxes, masks_to_boxes(instances.masks))
        checked += assert_aligned(out, instances)
    assert checked >= 6


def test_flip_mirrors_image_and_masks_exactly():
    image, masks, labels = painted_scene()
    out, instances = AugmentationPipeline([RandomFlip(p=1.0)])(image, masks, labels, np.random.default_rng(0))
    assert torch.equal(out, image.flip(-1))
    assert torch.equal(instances.masks, masks.flip(-1))
    assert instances.boxes[0].tolist() == [W - 40, 4, W - 6, 30]


def test_masks_are_resampled_at_pixel_centres_like_the_image():
    # A 3x downscale: output pixel (i, j) covers input pixels 3i..3i+2, whose centre is 3i+1.
    image, masks, labels = painted_scene()
    out, instances = build_test_transform(21, 1000)(image[:, :63], masks[:, :63], labels, np.random.default_rng(0))
    assert out.shape == (3, 21, 32)
    kept = masks[:, :63][masks[:, :63].flatten(1).any(dim=1)]
    assert torch.equal(instances.masks, kept[:, 1::3, 1::3])


@pytest.mark.parametrize("step", [RandomCrop(30, 30), FixedSizeCrop(30, 40)])
def test_crops_drop_exactly_the_instances_cropped_away(step):
    image, masks, labels = painted_scene()
    dropped = 0
    for seed in range(12):
        out, instances = AugmentationPipeline([step])(image, masks, labels, np.random.default_rng(seed))
        # Crops copy pixels exactly: an instance survives iff its colour is still in the image.
        present = [k for k in range(len(PALETTE)) if (out == PALETTE[k][:, None, None]).all(dim=0).any()]
        assert instances.labels.tolist() == present
        dropped += len(masks) - len(instances)
    assert dropped > 0


def test_lsj_output_is_a_square_canvas_padded_with_128():
    pipeline = build_train_transform("lsj", 64, min_scale=0.1, max_scale=0.5)
    image, masks, labels = painted_scene()
    for seed in range(4):
        out, instances = pipeline(image, masks, labels, np.random.default_rng(seed))
        # s <= 0.5 fits the 64x96 image into at most 22x32 pixels of the 64x64 canvas.
        assert out.shape == (3, 64, 64) and instances.image_size == (64, 64)
        assert (out[:, :, 32:] == 128).all() and (out[:, 22:, :] == 128).all()
        assert not instances.masks[:, :, 32:].any() and not instances.masks[:, 22:, :].any()


def test_fixed_size_crop_pads_smaller_images_at_bottom_right():
    image, masks, labels = painted_scene()
    out, instances = AugmentationPipeline([FixedSizeCrop(80, 100)])(image, masks, labels, np.random.default_rng(0))
    assert out.shape == (3, 80, 100)
    assert torch.equal(out[:, :H, :W], image)
    assert (out[:, H:, :] == 128).all() and (out[:, :, W:] == 128).all()
    assert torch.equal(instances.masks[:, :H, :W], masks) and not instances.masks[:, H:, :].any()


def test_resize_shortest_edge_respects_short_side_and_max_size():
    assert ResizeShortestEdge([32], 1000).output_size(H, W, 32) == (32, 48)
    assert ResizeShortestEdge([32], 40).output_size(H, W, 32) == (27, 40)
    image, masks, labels = painted_scene()
    out, instances = build_test_transform(32, 1000)(image, masks, labels, np.random.default_rng(0))
    assert out.shape == (3, 32, 48) and instances.image_size == (32, 48)


def test_resize_crop_output_never_exceeds_the_crop():
    pipeline = build_train_transform("resize_crop", (40, 64), short_edges=[48, 96])
    image, masks, labels = painted_scene()
    sizes = {tuple(pipeline(image, masks, labels, np.random.default_rng(s))[0].shape) for s in range(6)}
    assert sizes == {(3, 40, 64)}


def test_pipelines_are_deterministic_given_the_generator():
    pipeline = build_train_transform("resize_crop", (40, 64), short_edges=[48, 64, 96])
    image, masks, labels = painted_scene()
    a = pipeline(image, masks, labels, np.random.default_rng(7))
    b = pipeline(image, masks, labels, np.random.default_rng(7))
    c = pipeline(image, masks, labels, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].masks, b[1].masks)
    assert not torch.equal(a[0], c[0])


def test_scale_saturation_matches_hsv():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(50, 3)).astype(np.float64)
    for factor in (0.5, 1.4, 3.0):
        out = scale_saturation(torch.from_numpy(rgb.T[:, :, None]), factor)[:, :, 0].T.numpy()
        for before, after in zip(rgb / 255, out / 255):
            h, s, v = colorsys.rgb_to_hsv(*before)
            assert np.allclose(after, colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v), atol=1e-6)


def test_color_aug_ssd_changes_colours_only():
    image, masks, labels = painted_scene()
    pipeline = AugmentationPipeline([ColorAugSSD()])
    changed = 0
    for seed in range(5):
        out, instances = pipeline(image, masks, labels, np.random.default_rng(seed))
        assert torch.equal(instances.masks, masks) and out.shape == image.shape
        changed += int(not torch.equal(out, image))
    assert changed >= 3


def marker_centre(image: torch.Tensor) -> torch.Tensor:
    """Centroid (y, x) of the pixels brighter than midway between the darkest and brightest."""
    gray = image.float().mean(dim=0)
    return torch.nonzero(gray > (gray.min() + gray.max()) / 2).float().mean(dim=0)


@pytest.mark.parametrize("kind,size", [("lsj", 64), ("resize_crop", (48, 64))])
def test_strong_view_shares_the_weak_view_geometry(kind, size):
    # A light grey marker on dark grey (LSJ padding too): every photometric op keeps it the brightest.
    image = torch.full((3, H, W), 40, dtype=torch.uint8)
    image[:, 20:34, 50:62] = 200
    pipeline = build_train_transform(kind, size, min_scale=0.8, max_scale=1.2, short_edges=[64], color=False,
                                     pad_value=40)
    off = StrongAugmentation(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    on = StrongAugmentation(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0)
    visible = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        weak = pipeline.image_only(image, rng)
        assert torch.equal(off(weak, rng), weak)
        strong = on(weak, rng)
        assert strong.shape == weak.shape and strong.dtype == torch.uint8 and not torch.equal(strong, weak)
        assert torch.equal(strong[0], strong[1]) and torch.equal(strong[1], strong[2])  # grayscale applied
        if (weak > 100).any():  # marker inside the crop
            assert torch.allclose(marker_centre(strong), marker_centre(weak), atol=1.0)
            visible += 1
    assert visible >= 2


def test_strong_augmentation_is_deterministic_given_the_generator():
    image, _, _ = painted_scene()
    strong = StrongAugmentation()
    assert torch.equal(strong(image, np.random.default_rng(3)), strong(image, np.random.default_rng(3)))


def hue_and_saturation(image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[3, H, W] uint8 -> (hue, saturation), each [H*W] in 0..1."""
    pixels = image.flatten(1).T.numpy() / 255.0
    return np.array([colorsys.rgb_to_hsv(*p)[:2] for p in pixels]).T


def largest_hue_shift(hue_strength: float) -> float:
    """Over 8 fully jittered views: the largest median per-pixel hue change (saturated pixels only)."""
    image, _, _ = painted_scene()
    config = AugmentationConfig(strong_jitter_p=1.0, strong_grayscale_p=0.0, strong_blur_p=0.0,
                                strong_hue=hue_strength)
    hue_before, saturation = hue_and_saturation(image)
    shifts = []
    for seed in range(8):
        strong = config.strong_transform()(image, np.random.default_rng(seed))
        assert not torch.equal(strong, image)
        hue_after, saturation_after = hue_and_saturation(strong)
        change = np.abs(hue_after - hue_before)
        shifts.append(np.median(np.minimum(change, 1 - change)[(saturation > 0.3) & (saturation_after > 0.3)]))
    return float(max(shifts))


def test_strong_hue_zero_keeps_each_pixels_hue():
    # brightness, contrast and saturation change the colours but, without a hue shift, not the hue
    assert largest_hue_shift(0.0) < 0.01
    assert largest_hue_shift(0.1) > 0.04


def test_augmentation_config_builds_and_validates():
    config = AugmentationConfig(kind="resize_crop", crop_size=[40, 64], short_edges=[48, 64])
    assert config.crop_size == (40, 64)
    image, masks, labels = painted_scene()
    assert config.train_transform()(image, masks, labels, np.random.default_rng(0))[0].shape == (3, 40, 64)
    assert config.test_transform().steps[0].short_edges == (800,)
    with pytest.raises(ConfigError, match="kind"):
        AugmentationConfig(kind="mosaic")
    with pytest.raises(ConfigError, match="strong_blur_p"):
        AugmentationConfig(strong_blur_p=1.5)
    with pytest.raises(ConfigError, match="strong_hue"):
        AugmentationConfig(strong_hue=0.7)
    with pytest.raises(ConfigError, match="min_scale"):
        AugmentationConfig(min_scale=2.0, max_scale=1.0)
