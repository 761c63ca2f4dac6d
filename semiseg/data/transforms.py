"""Training and test augmentations: geometry shared by an image and its instance masks, colour.

An image is a `[3, H, W]` uint8 RGB tensor, its instances are `masks [N, H, W]` bool with
`labels [N]`. A geometric step samples its parameters once from a `numpy.random.Generator` and
applies them to the image (bilinear, antialiased when shrinking) and to every mask (nearest), so
the two stay pixel-aligned. `AugmentationPipeline` runs the steps, drops the instances that
became empty (cropped away) and recomputes boxes from the masks.

Pipelines (as Mask2Former / Guided Distillation):
- "lsj" (COCO large-scale jitter): RandomFlip -> ResizeScale(0.1..2.0 of S x S) -> FixedSizeCrop(S x S).
- "resize_crop" (Cityscapes): ResizeShortestEdge(choice) -> RandomCrop(h, w) -> ColorAugSSD -> RandomFlip.
- test: ResizeShortestEdge(short, max), deterministic.
The strong view of an unlabeled image is `StrongAugmentation` (colour jitter, grayscale, blur)
applied to the weak view's output, so it shares the weak view's geometry exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as TF

from semiseg.errors import ConfigError
from semiseg.structures import Instances


@dataclass
class AugSample:
    """An image with its instances while it is being augmented.

    image:  [3, H, W] uint8 RGB
    masks:  [N, H, W] bool
    labels: [N] long
    """

    image: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])


class Step(Protocol):
    """One augmentation step: samples its parameters from `rng`, returns the transformed sample."""

    def __call__(self, sample: AugSample, rng: np.random.Generator) -> AugSample: ...


def _resize(sample: AugSample, height: int, width: int) -> AugSample:
    """Image bilinear (antialiased), masks nearest; pixel centres map onto pixel centres."""
    if sample.size == (height, width):
        return sample
    image = TF.resize(sample.image, [height, width], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if sample.masks.shape[0] == 0:
        masks = sample.masks.new_zeros(0, height, width)
    else:
        masks = F.interpolate(sample.masks[None].to(torch.uint8), size=(height, width), mode="nearest-exact")[0].bool()
    return AugSample(image, masks, sample.labels)


def _crop(sample: AugSample, top: int, left: int, height: int, width: int) -> AugSample:
    return AugSample(sample.image[:, top:top + height, left:left + width],
                     sample.masks[:, top:top + height, left:left + width], sample.labels)


def _scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


class RandomFlip:
    """Flip horizontally (or vertically) with probability `p`."""

    def __init__(self, p: float = 0.5, horizontal: bool = True):
        self.p = p
        self.dim = -1 if horizontal else -2

    def __call__(self, sample: AugSample, rng: np.random.Generator) -> AugSample:
        if rng.random() >= self.p:
            return sample
        return AugSample(sample.image.flip(self.dim), sample.masks.flip(self.dim), sample.labels)


class ResizeScale:
    """Scale s ~ U(min_scale, max_scale); resize to fit in (s * target_h, s * target_w), keeping aspect ratio."""

    def __init__(self, min_scale: float, max_scale: float, target_height: int, target_width: int):
        self.min_scale, self.max_scale = min_scale, max_scale
        self.target_height, self.target_width = target_height, target_width

    def __call__(self, sample: AugSample, rng: np.random.Generator) -> AugSample:
        h, w = sample.size
        s = rng.uniform(self.min_scale, self.max_scale)
        scale = min(s * self.target_height / h, s * self.target_width / w)
        return _resize(sample, *_scaled_size(h, w, scale))


class FixedSizeCrop:
    """Random crop to at most (height, width), then pad bottom/right to exactly (height, width).

    The image is padded with `pad_value` (128 as the reference LSJ), masks with False. The pad is
    part of the canvas: the sample's image size is (height, width) afterwards, as in the reference.
    """

    def __init__(self, height: int, width: int, pad_value: int = 128):
        self.height, self.width, self.pad_value = height, width, pad_value

    def __call__(self, sample: AugSample, rng: np.random.Generator) -> AugSample:
        h, w = sample.size
        top = int(rng.integers(0, max(h - self.height, 0) + 1))
        left = int(rng.integers(0, max(w - self.width, 0) + 1))
        sample = _crop(sample, top, left, self.height, self.width)
        h, w = sample.size
        image = sample.image.new_full((3, self.height, self.width), self.pad_value)
        image[:, :h, :w] = sample.image
        masks = sample.masks.new_zeros(sample.masks.shape[0], self.height, self.width)
        masks[:, :h, :w] = sample.masks
        return AugSample(image, masks, sample.labels)


class ResizeShortestEdge:
    """Resize the short side to a size drawn from `short_edges` (one value: deterministic), long side <= max_size."""

    def __init__(self, short_edges: Sequence[int], max_size: int):
        self.short_edges = tuple(short_edges)
        self.max_size = max_size

    def output_size(self, height: int, width: int, short: int) -> tuple[int, int]:
        scale = short / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return _scaled_size(height, width, scale)

    def __call__(self, sample: AugSample, rng: np.random.Generator) -> AugSample:
        short = self.short_edges[int(rng.integers(len(self.short_edges)))]
        return _resize(sample, *self.output_size(*sample.size, short))


class RandomCrop:
    """Crop a random (height, width) window; a side shorter than the window is kept whole."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def __call__(self, sample: AugSample, rng: np.random.Generator) -> AugSample:
        h, w = sample.size
        ch, cw = min(self.height, h), min(self.width, w)
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        return _crop(sample, top, left, ch, cw)


def scale_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply the HSV saturation of a float RGB image [3, H, W] (0..255) by `factor`, clipped at 1.

    Keeping H and V fixed, every channel c moves to V - (V - c) * k with k = S' / S.
    """
    value = image.amax(dim=0)
    spread = value - image.amin(dim=0)
    k = torch.where(spread > 0, torch.minimum(torch.full_like(value, factor), value / spread.clamp(min=1e-6)),
                    torch.ones_like(value))
    return value - (value - image) * k


class ColorAugSSD:
    """SSD-style colour distortion of the image only (masks untouched), each part with probability 0.5.

    brightness + U(-32, 32); then either contrast -> saturation -> hue or saturation -> hue -> contrast;
    contrast and saturation (HSV) factors ~ U(0.5, 1.5), hue shift ~ U(-18, 18) degrees/2 (OpenCV
    units, i.e. up to 0.1 of the hue circle). Values are clipped to 0..255 after every part.
    """

    def __init__(self, brightness_delta: float = 32.0, contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.5, 1.5), hue_delta: float = 18.0):
        self.brightness_delta = brightness_delta
        self.contrast, self.saturation, self.hue_delta = contrast, saturation, hue_delta

    def __call__(self, sample: AugSample, rng: np.random.Generator) -> AugSample:
        image = sample.image.float()
        if rng.random() < 0.5:
            image = (image + rng.uniform(-self.brightness_delta, self.brightness_delta)).clamp(0, 255)
        contrast_first = rng.random() < 0.5
        parts = [self._contrast, self._saturation, self._hue]
        for part in parts if contrast_first else parts[1:] + parts[:1]:
            if rng.random() < 0.5:
                image = part(image, rng).clamp(0, 255)
        return AugSample(image.round().to(torch.uint8), sample.masks, sample.labels)

    def _contrast(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return image * rng.uniform(*self.contrast)

    def _saturation(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return scale_saturation(image, rng.uniform(*self.saturation))

    def _hue(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        shift = rng.uniform(-self.hue_delta, self.hue_delta) / 180.0
        return TF.adjust_hue(image / 255.0, shift) * 255.0


class AugmentationPipeline:
    """Runs steps in order, then drops empty instances and recomputes boxes from the masks."""

    def __init__(self, steps: Sequence[Step]):
        self.steps = list(steps)

    def __call__(self, image: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, Instances]:
        """image [3, H, W] uint8, masks [N, H, W] bool, labels [N] -> (image [3, H', W'], Instances on H' x W')."""
        sample = AugSample(image, masks.bool(), labels.long())
        for step in self.steps:
            sample = step(sample, rng)
        keep = sample.masks.flatten(1).any(dim=1)
        return sample.image.contiguous(), Instances.from_masks(sample.labels[keep], sample.masks[keep].contiguous())

    def image_only(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The augmented image [3, H', W'] of an image without instances (unlabeled or test data)."""
        h, w = image.shape[-2:]
        no_masks = torch.zeros(0, h, w, dtype=torch.bool)
        return self(image, no_masks, torch.zeros(0, dtype=torch.long), rng)[0]


class StrongAugmentation:
    """Photometric strong view (as Guided Distillation): applied to the weak view's uint8 output.

    RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=jitter_p) -> RandomGrayscale(p=grayscale_p)
    -> RandomApply(GaussianBlur(radius sigma ~ U(0.1, 2.0)), p=blur_p). Runs on a PIL image like
    the reference (several times faster than the tensor ops on CPU). No geometry, so the strong
    view is pixel-aligned with the weak view. image [3, H, W] uint8 -> [3, H, W] uint8.
    """

    def __init__(self, jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_p: float = 0.5,
                 brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 blur_sigma: tuple[float, float] = (0.1, 2.0)):
        self.jitter_p, self.grayscale_p, self.blur_p = jitter_p, grayscale_p, blur_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur_sigma = blur_sigma

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        jitter, gray, blur = (rng.random() < p for p in (self.jitter_p, self.grayscale_p, self.blur_p))
        if not (jitter or gray or blur):
            return image
        picture = Image.fromarray(image.permute(1, 2, 0).numpy())
        if jitter:
            picture = self._jitter(picture, rng)
        if gray:
            picture = TF.rgb_to_grayscale(picture, num_output_channels=3)
        if blur:
            picture = picture.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_sigma)))
        return torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()

    def _jitter(self, picture: Image.Image, rng: np.random.Generator) -> Image.Image:
        """torchvision ColorJitter: the four adjustments in a random order."""
        factors = [rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness),
                   rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast),
                   rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation),
                   rng.uniform(-self.hue, self.hue)]
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for i in rng.permutation(4):
            picture = ops[i](picture, float(factors[i]))
        return picture


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigError(f"augmentation {name}={size!r}: expected a positive int or [height, width]")
    return pair


def default_short_edges(crop_short: int) -> tuple[int, ...]:
    """Multi-scale short sides 1.0, 1.2, ..., 4.0 x the crop's short side (512x1024 crop: Cityscapes' 512..2048)."""
    return tuple(crop_short * f // 10 for f in range(10, 41, 2))


def build_train_transform(kind: str, size: int | Sequence[int], *, min_scale: float = 0.1, max_scale: float = 2.0,
                          short_edges: Sequence[int] | None = None, max_size: int | None = None,
                          color: bool = True, flip: bool = True, pad_value: int = 128) -> AugmentationPipeline:
    """The weak/geometric training pipeline.

    kind "lsj":         size = canvas side S (or (h, w)); uses min_scale, max_scale, pad_value.
    kind "resize_crop": size = crop (h, w); short_edges default `default_short_edges(min(crop))`,
                        max_size default 4 x max(crop); `color` toggles ColorAugSSD.
    """
    height, width = _pair(size, "image_size" if kind == "lsj" else "crop_size")
    flip_steps: list[Step] = [RandomFlip()] if flip else []
    if kind == "lsj":
        if not 0 < min_scale <= max_scale:
            raise ConfigError(f"augmentation min_scale={min_scale}, max_scale={max_scale}: need 0 < min <= max")
        return AugmentationPipeline(flip_steps + [ResizeScale(min_scale, max_scale, height, width),
                                                  FixedSizeCrop(height, width, pad_value)])
    if kind == "resize_crop":
        edges = tuple(short_edges) if short_edges else default_short_edges(min(height, width))
        if not all(isinstance(e, int) and e > 0 for e in edges):
            raise ConfigError(f"augmentation short_edges={list(edges)}: expected positive ints")
        steps: list[Step] = [ResizeShortestEdge(edges, max_size or 4 * max(height, width)), RandomCrop(height, width)]
        return AugmentationPipeline(steps + ([ColorAugSSD()] if color else []) + flip_steps)
    raise ConfigError(f"augmentation kind={kind!r}: expected 'lsj' or 'resize_crop'")


def build_test_transform(short_edge: int, max_size: int) -> AugmentationPipeline:
    """Deterministic test-time resize: short side to `short_edge`, long side at most `max_size`, no crop."""
    if short_edge <= 0 or max_size <= 0:
        raise ConfigError(f"augmentation test sizes ({short_edge}, {max_size}) must be positive")
    return AugmentationPipeline([ResizeShortestEdge([short_edge], max_size)])


@dataclass
class AugmentationConfig:
    """How a config file describes augmentations (embedded in the training config).

    kind:            "lsj" (COCO) or "resize_crop" (Cityscapes)
    image_size:      LSJ canvas side S
    min_scale/max_scale: LSJ scale range
    crop_size:       resize_crop window [h, w]
    short_edges:     resize_crop short sides to choose from ([] = 1.0..4.0 x the crop's short side)
    max_size:        resize_crop long-side limit (0 = 4 x the crop's long side)
    color:           resize_crop ColorAugSSD on/off
    flip:            random horizontal flip on/off
    strong_*_p:      probabilities of the strong view's colour jitter, grayscale and blur (0 = off)
    strong_hue:      the colour jitter's largest hue shift (fraction of the hue circle, reference 0.1);
                     lower it when hue tells the classes apart (the built-in dataset)
    test_short_edge/test_max_size: test-time resize
    """

    kind: str = "lsj"
    image_size: int = 1024
    min_scale: float = 0.1
    max_scale: float = 2.0
    crop_size: tuple[int, int] = (512, 1024)
    short_edges: tuple[int, ...] = ()
    max_size: int = 0
    color: bool = True
    flip: bool = True
    strong_jitter_p: float = 0.8
    strong_grayscale_p: float = 0.2
    strong_blur_p: float = 0.5
    strong_hue: float = 0.1
    test_short_edge: int = 800
    test_max_size: int = 1333

    def __post_init__(self) -> None:
        self.crop_size = _pair(self.crop_size, "crop_size")
        self.short_edges = tuple(self.short_edges)
        for name in ("strong_jitter_p", "strong_grayscale_p", "strong_blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"augmentation {name}={getattr(self, name)}: expected a probability in [0, 1]")
        if not 0.0 <= self.strong_hue <= 0.5:
            raise ConfigError(f"augmentation strong_hue={self.strong_hue}: expected a value in [0, 0.5]")
        self.train_transform()  # validates kind and sizes
        self.test_transform()

    def train_transform(self) -> AugmentationPipeline:
        size = self.image_size if self.kind == "lsj" else self.crop_size
        return build_train_transform(self.kind, size, min_scale=self.min_scale, max_scale=self.max_scale,
                                     short_edges=self.short_edges or None, max_size=self.max_size or None,
                                     color=self.color, flip=self.flip)

    def strong_transform(self) -> StrongAugmentation:
        return StrongAugmentation(self.strong_jitter_p, self.strong_grayscale_p, self.strong_blur_p,
                                  hue=self.strong_hue)

    def test_transform(self) -> AugmentationPipeline:
        return build_test_transform(self.test_short_edge, self.test_max_size)
