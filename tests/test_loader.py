import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg.data.datasets import EvalDataset, LabeledDataset, Sample, UnlabeledDataset
from semiseg.data.loader import build_eval_loader, build_train_loader, collate
from semiseg.data.masks import decode_segmentation
from semiseg.data.records import Annotation, DatasetRecords, ImageRecord
from semiseg.data.samplers import (InferenceSampler, InfiniteSampler, RepeatFactorSampler,
                                   repeat_factors_from_records)
from semiseg.data.transforms import (AugmentationConfig, StrongAugmentation, build_test_transform,
                                     build_train_transform)
from semiseg.errors import DataError
from semiseg.structures import Instances, masks_to_boxes

H, W = 64, 96
PALETTE = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230]], dtype=np.uint8)


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_dataset(folder: Path, num_images: int = 6) -> DatasetRecords:
    """PNG images whose instance k (class k % 3) is painted PALETTE[k % 3] exactly over its decoded
    polygon; image 0 also has a crowd region, image 1 has only a crowd region."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(num_images):
        image = np.full((H, W, 3), 40, dtype=np.uint8)
        annotations = []
        for k in range(1 + i % 3):
            x0, y0 = rng.integers(0, W - 30), rng.integers(0, H - 24)
            segmentation = rectangle(x0, y0, x0 + rng.integers(14, 30), y0 + rng.integers(12, 24))
            image[decode_segmentation(segmentation, H, W)] = PALETTE[k % 3]
            annotations.append(Annotation(label=k % 3, segmentation=segmentation, ann_id=10 * i + k))
        if i == 1:
            annotations = []
        if i in (0, 1):
            annotations.append(Annotation(label=2, segmentation=rectangle(0, 0, 10, 10), iscrowd=True))
        path = folder / f"{i:03d}.png"
        Image.fromarray(image).save(path)
        records.append(ImageRecord(path, image_id=100 + i, height=H, width=W, annotations=annotations))
    return DatasetRecords(records, ["a", "b", "c"], [1, 2, 5], folder / "instances.json")


@pytest.fixture
def records(tmp_path: Path) -> DatasetRecords:
    return write_dataset(tmp_path)


def lsj() -> object:
    return build_train_transform("lsj", 64, min_scale=0.5, max_scale=1.5)


# ----------------------------------------------------------------------------------------- datasets

def test_labeled_dataset_drops_crowd_and_empty_images_and_keeps_masks_on_their_pixels(records):
    dataset = LabeledDataset(records, build_test_transform(64, 1000))
    assert [r.image_id for r in dataset.records.records] == [100, 102, 103, 104, 105]  # 101 has only a crowd
    for index in range(len(dataset)):
        sample = dataset[index]
        record = dataset.records.records[index]
        assert sample.image_id == record.image_id and sample.orig_size == (H, W)
        assert sample.image.shape == (3, H, W) and sample.image.dtype == torch.uint8
        assert len(sample.instances) == sum(not a.iscrowd for a in record.annotations)
        assert torch.equal(sample.instances.boxes, masks_to_boxes(sample.instances.masks))
        masks = sample.instances.masks
        for j, label in enumerate(sample.instances.labels):
            visible = masks[j] & ~masks[j + 1:].any(dim=0)  # later instances paint over earlier ones
            colours = sample.image[:, visible].T
            assert torch.equal(colours.unique(dim=0), torch.from_numpy(PALETTE[label])[None])


def test_labeled_dataset_can_keep_images_without_instances(records):
    dataset = LabeledDataset(records, lsj(), filter_empty=False)
    assert len(dataset) == 6 and len(dataset[1].instances) == 0


def test_unreadable_training_image_is_skipped_and_reported_with_the_sample_or_raises_when_strict(records):
    Path(records.records[2].file_name).write_bytes(b"not a png")
    dataset = LabeledDataset(records, lsj())
    sample = dataset[1]  # record 102 (index 1 after filtering) is broken -> the next one
    assert sample.image_id == 103 and len(sample.skipped) == 1 and "002.png" in sample.skipped[0]
    assert dataset[1].image_id == 103 and dataset[1].skipped == ()  # remembered: no second read
    with pytest.raises(DataError, match=r"002\.png"):
        LabeledDataset(records, lsj(), strict=True)[1]


def test_image_whose_size_disagrees_with_its_record_is_a_data_error(records):
    Image.new("RGB", (W, H + 1)).save(records.records[0].file_name)
    with pytest.raises(DataError, match=r"000\.png.*65x96.*64x96"):
        LabeledDataset(records, lsj(), strict=True)[0]


def test_filter_empty_with_only_crowd_images_is_a_data_error(records):
    only_crowd = DatasetRecords(records.records[1:2], records.class_names, records.category_ids, records.source)
    with pytest.raises(DataError, match="instances.json.*non-crowd"):
        LabeledDataset(only_crowd, lsj())


def marker_centre(image: torch.Tensor) -> torch.Tensor:
    """Centroid (y, x) of the pixels brighter than midway between the darkest and brightest."""
    gray = image.float().mean(dim=0)
    return torch.nonzero(gray > (gray.min() + gray.max()) / 2).float().mean(dim=0)


@pytest.mark.parametrize("kind,size", [("lsj", 64), ("resize_crop", (48, 64))])
def test_unlabeled_weak_and_strong_views_share_geometry(tmp_path, kind, size):
    image = np.full((H, W, 3), 40, dtype=np.uint8)
    image[20:34, 50:62] = 200  # a grey marker on darker grey (LSJ padding too): the brightest spot in any jitter
    Image.fromarray(image).save(tmp_path / "u.png")
    records = DatasetRecords([ImageRecord(tmp_path / "u.png", 7)], [], [], tmp_path)
    weak_only = build_train_transform(kind, size, min_scale=0.8, max_scale=1.2, short_edges=[64], color=False,
                                      pad_value=40)
    plain = UnlabeledDataset(records, weak_only, StrongAugmentation(0.0, 0.0, 0.0))
    strong = UnlabeledDataset(records, weak_only, StrongAugmentation(1.0, 0.0, 1.0))
    visible = 0
    for seed in range(3):
        plain.reseed(seed)
        sample = plain[0]
        assert sample.image_id == 7 and sample.orig_size == (H, W) and sample.instances is None
        assert torch.equal(sample.strong, sample.image)
        strong.reseed(seed)
        sample = strong[0]
        assert not torch.equal(sample.strong, sample.image)
        if (sample.image > 100).any():  # marker inside the crop
            assert torch.allclose(marker_centre(sample.strong), marker_centre(sample.image), atol=1.0)
            visible += 1
    assert visible >= 2


def test_eval_dataset_resizes_deterministically_and_reports_the_original_size(records):
    dataset = EvalDataset(records, build_test_transform(32, 1000))
    a, b = dataset[3], dataset[3]
    assert a.image.shape == (3, 32, 48) and a.orig_size == (H, W) and a.image_id == 103
    assert torch.equal(a.image, b.image)


def test_eval_dataset_raises_on_an_unreadable_image(records):
    Path(records.records[0].file_name).unlink()
    with pytest.raises(DataError, match=r"000\.png"):
        EvalDataset(records, build_test_transform(32, 1000))[0]


# ----------------------------------------------------------------------------------------- samplers

def test_infinite_sampler_shards_are_disjoint_cover_every_pass_and_reshuffle():
    size = 10
    shards = [list(itertools.islice(iter(InfiniteSampler(size, seed=3, rank=r, world_size=2)), 15)) for r in (0, 1)]
    passes = []
    for p in range(3):
        first, second = shards[0][5 * p:5 * p + 5], shards[1][5 * p:5 * p + 5]
        assert not set(first) & set(second) and sorted(first + second) == list(range(size))
        passes.append(first)
    assert passes[0] != passes[1]
    again = list(itertools.islice(iter(InfiniteSampler(size, seed=3, rank=0, world_size=2)), 15))
    assert again == shards[0]
    other = list(itertools.islice(iter(InfiniteSampler(size, seed=4, rank=0, world_size=2)), 15))
    assert other != shards[0]
    ordered = list(itertools.islice(iter(InfiniteSampler(4, shuffle=False, rank=1, world_size=2)), 4))
    assert ordered == [1, 3, 1, 3]


def test_repeat_factor_sampler_repeats_integer_factors_exactly_per_pass():
    sampler = RepeatFactorSampler([1.0, 2.0, 3.0], seed=0, rank=0, world_size=1)
    stream = list(itertools.islice(iter(sampler), 12))
    assert sorted(stream[:6]) == [0, 1, 1, 2, 2, 2] and sorted(stream[6:]) == [0, 1, 1, 2, 2, 2]
    ranks = [list(itertools.islice(iter(RepeatFactorSampler([1.0, 2.0, 3.0], rank=r, world_size=2)), 3))
             for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == [0, 1, 1, 2, 2, 2]


def records_with_classes(classes_per_image: list[list[int]]) -> DatasetRecords:
    records = [ImageRecord(Path(f"{i}.png"), i, H, W, [Annotation(c, rectangle(0, 0, 5, 5)) for c in classes])
               for i, classes in enumerate(classes_per_image)]
    return DatasetRecords(records, ["common", "rare"], [1, 2], Path("train.json"))


def test_repeat_factors_follow_sqrt_of_threshold_over_class_frequency():
    # class 0 in all 10 images, class 1 in one of them (f = 0.1), one image without annotations
    records = records_with_classes([[0, 1]] + [[0]] * 9 + [[]])
    factors = repeat_factors_from_records(records, threshold=0.5)
    f_common, f_rare = 10 / 11, 1 / 11
    expected = [np.sqrt(0.5 / f_rare)] + [max(1.0, np.sqrt(0.5 / f_common))] * 9 + [1.0]
    assert np.allclose(factors.numpy(), expected)
    assert np.allclose(repeat_factors_from_records(records, threshold=10.0)[1:10].numpy(), np.sqrt(10 / f_common))


def test_repeat_factor_sampler_repeats_rare_images_sqrt_t_over_f_times_on_average():
    records = records_with_classes([[0, 1]] + [[0]] * 9 + [[]])
    factors = repeat_factors_from_records(records, threshold=0.5)  # rare image: sqrt(5.5) = 2.345
    sampler = RepeatFactorSampler(factors, seed=0, rank=0, world_size=1)
    passes = 400
    expected_length = int(factors.sum().item() * passes)
    counts = np.bincount(list(itertools.islice(iter(sampler), expected_length)), minlength=11)
    assert counts[0] / passes == pytest.approx(np.sqrt(0.5 * 11), abs=0.08)
    assert counts[1:].mean() / passes == pytest.approx(1.0, abs=0.05)


def test_inference_sampler_gives_contiguous_shards_covering_each_index_once():
    shards = [list(InferenceSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(InferenceSampler(10, rank=r, world_size=3)) for r in range(3)] == [4, 3, 3]


# ----------------------------------------------------------------------------------------- collate / loaders

def labeled_sample(h: int, w: int, image_id: int) -> Sample:
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 1:4, 2:6] = True
    masks[1, h - 1, w - 1] = True
    image = torch.randint(1, 255, (3, h, w), dtype=torch.uint8)
    return Sample(image, image_id, (2 * h, 2 * w), instances=Instances.from_masks(torch.tensor([0, 2]), masks))


def test_collate_pads_to_a_multiple_of_32_and_keeps_sizes_and_targets():
    samples = [labeled_sample(40, 50, 1), labeled_sample(20, 70, 2)]
    batch = collate(samples)
    assert batch.images.shape == (2, 3, 64, 96) and batch.images.dtype == torch.uint8
    assert batch.image_sizes == [(40, 50), (20, 70)] and batch.image_ids == [1, 2]
    assert batch.orig_sizes == [(80, 100), (40, 140)] and batch.strong is None
    for sample, image, target in zip(samples, batch.images, batch.targets):
        h, w = sample.image.shape[-2:]
        assert torch.equal(image[:, :h, :w], sample.image)
        assert image[:, h:].eq(0).all() and image[:, :, w:].eq(0).all()
        assert target.masks.shape == (2, 64, 96) and torch.equal(target.masks[:, :h, :w], sample.instances.masks)
        assert target.masks.sum() == sample.instances.masks.sum()
        assert torch.equal(target.boxes, sample.instances.boxes) and torch.equal(target.labels, sample.instances.labels)
    assert collate(samples, size_divisibility=1).images.shape == (2, 3, 40, 70)


def test_collate_stacks_strong_views_of_unlabeled_samples_and_refuses_mixed_batches():
    weak = [torch.full((3, 30, 40), 1, dtype=torch.uint8), torch.full((3, 33, 20), 2, dtype=torch.uint8)]
    samples = [Sample(w, i, (30, 40), strong=w + 10) for i, w in enumerate(weak)]
    batch = collate(samples)
    assert batch.targets is None and batch.strong.shape == batch.images.shape == (2, 3, 64, 64)
    assert torch.equal(batch.strong[1, :, :33, :20], weak[1] + 10) and batch.strong[1, :, 33:].eq(0).all()
    with pytest.raises(ValueError, match="mixes"):
        collate([samples[0], labeled_sample(30, 40, 5)])


def take(loader, n: int) -> list:
    return list(itertools.islice(iter(loader), n))


def assert_same_batches(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and x.image_ids == y.image_ids
        for s, t in zip(x.targets, y.targets, strict=True):
            assert torch.equal(s.masks, t.masks) and torch.equal(s.labels, t.labels)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_is_deterministic_given_the_seed(records, num_workers):
    def batches(seed: int) -> list:
        dataset = LabeledDataset(records, lsj())
        sampler = InfiniteSampler(len(dataset), seed=seed, rank=0, world_size=1)
        return take(build_train_loader(dataset, sampler, batch_size=2, num_workers=num_workers, seed=seed), 3)

    first = batches(0)
    assert [b.images.shape for b in first] == [(2, 3, 64, 64)] * 3
    assert_same_batches(first, batches(0))
    assert not all(torch.equal(x.images, y.images) for x, y in zip(first, batches(1)))


def test_eval_loader_visits_this_ranks_shard_once(records):
    dataset = EvalDataset(records, build_test_transform(32, 1000))
    ids = [[i for batch in build_eval_loader(dataset, batch_size=2, rank=r, world_size=2) for i in batch.image_ids]
           for r in (0, 1)]
    assert ids == [[100, 101, 102], [103, 104, 105]]
    batch = next(iter(build_eval_loader(dataset, batch_size=2, rank=0, world_size=1)))
    assert batch.images.shape == (2, 3, 32, 64) and batch.image_sizes == [(32, 48)] * 2
    assert batch.orig_sizes == [(H, W)] * 2


def test_loader_workers_draw_different_augmentations(records):
    one_image = DatasetRecords(records.records[:1], records.class_names, records.category_ids, records.source)
    dataset = LabeledDataset(one_image, lsj())
    loader = build_train_loader(dataset, InfiniteSampler(1, rank=0, world_size=1), batch_size=1, num_workers=2)
    first, second = take(loader, 2)  # made by worker 0 and worker 1 from the same image
    assert first.image_ids == second.image_ids == [100]
    assert not torch.equal(first.images, second.images)


def test_synthetic_coco_dataset_end_to_end_through_the_real_readers(tmp_path):
    from semiseg.data.coco import load_coco_instances
    from semiseg.data.synthetic import write_synthetic_dataset
    from semiseg.data.unlabeled import load_unlabeled

    paths = write_synthetic_dataset(tmp_path / "synth", num_train=6, num_val=2, image_size=64)
    records = load_coco_instances(paths["train_ann"], paths["train_images"])
    augmentation = AugmentationConfig(image_size=64, min_scale=0.5, max_scale=1.5)
    labeled = LabeledDataset(records, augmentation.train_transform())
    unlabeled = UnlabeledDataset(load_unlabeled(paths["train_images"]), augmentation.train_transform(),
                                 augmentation.strong_transform())
    repeat_factors = repeat_factors_from_records(labeled.records)
    labeled_batch = next(iter(build_train_loader(labeled, RepeatFactorSampler(repeat_factors, rank=0, world_size=1),
                                                 batch_size=2)))
    unlabeled_batch = next(iter(build_train_loader(unlabeled, InfiniteSampler(len(unlabeled), rank=0, world_size=1),
                                                   batch_size=2)))
    assert labeled_batch.images.shape == unlabeled_batch.strong.shape == (2, 3, 64, 64)
    for target in labeled_batch.targets:
        assert target.masks.flatten(1).any(dim=1).all() and (target.labels < records.num_classes).all()
        assert torch.equal(target.boxes, masks_to_boxes(target.masks))
