"""Overlays: masks recolour their pixels only, thresholds hide instances, PNGs are written."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from dataclasses import replace
from PIL import Image

from semiseg.structures import Instances
from semiseg.visualize import draw_instances, instance_color, save_overlay, save_side_by_side

CLASS_NAMES = ["circle", "square"]


def _image(h: int = 96, w: int = 128) -> np.ndarray:
    return np.full((h, w, 3), 100, dtype=np.uint8)


def _two_instances(scores: list[float] | None) -> Instances:
    """A 20x20 square at the top left and a 16x24 block at the bottom right of a 96x128 canvas."""
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[0, 30:50, 10:30] = True
    masks[1, 70:86, 90:114] = True
    return Instances.from_masks(torch.tensor([1, 0]), masks, None if scores is None else torch.tensor(scores))


def test_masks_recolour_their_pixels_and_leave_the_rest():
    image = _image()
    out = draw_instances(image, _two_instances([0.9, 0.8]), CLASS_NAMES, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    expected = np.round(100 * 0.5 + np.array(instance_color(0)) * 0.5)
    assert np.array_equal(out[40, 20], expected)  # mask interior: the 50/50 blend
    assert np.array_equal(out[30, 20], instance_color(0))  # contour pixel in full colour
    assert not np.array_equal(out[78, 100], image[78, 100])  # second instance drawn too
    assert np.array_equal(out[:12], image[:12])  # far from both instances and their labels
    assert np.array_equal(out[55:, :60], image[55:, :60])
    assert np.array_equal(image, _image())  # input untouched


def test_below_threshold_instances_are_not_drawn():
    image = _image()
    out = draw_instances(image, _two_instances([0.9, 0.2]), CLASS_NAMES, score_threshold=0.5)
    assert not np.array_equal(out[40, 20], image[40, 20])
    assert np.array_equal(out[60:96, 80:128], image[60:96, 80:128])  # the 0.2 instance's whole area


def test_ground_truth_is_drawn_entirely_and_boxes_are_optional():
    image = _image()
    yy, xx = np.mgrid[:96, :128]
    disk = torch.from_numpy((yy - 60) ** 2 + (xx - 64) ** 2 <= 15 ** 2)[None]  # box [49, 45, 80, 76]
    gt = Instances.from_masks(torch.tensor([0]), disk)
    with_box = draw_instances(image, gt, CLASS_NAMES, show_boxes=True)
    without_box = draw_instances(image, gt, CLASS_NAMES, show_boxes=False)
    assert np.array_equal(with_box[60, 64], without_box[60, 64])  # the disk itself is drawn alike
    assert not np.array_equal(without_box[60, 64], image[60, 64])
    assert np.array_equal(with_box[75, 49], instance_color(0))  # bottom-left box corner, outside the disk
    assert np.array_equal(without_box[75, 49], image[75, 49])


def test_label_text_is_drawn_above_the_box():
    image = _image()
    out = draw_instances(image, _two_instances([0.93, 0.1]), CLASS_NAMES, alpha=0.0, show_boxes=False)
    label_strip = out[18:30, 10:60]  # just above the first instance (top edge y=30)
    assert (label_strip != 100).any(axis=-1).sum() > 50


def test_labels_at_the_right_edge_stay_inside_the_image():
    masks = torch.zeros(1, 96, 128, dtype=torch.bool)
    masks[0, 40:60, 120:128] = True
    out = draw_instances(_image(), Instances.from_masks(torch.tensor([0]), masks, torch.tensor([0.75])),
                         CLASS_NAMES, alpha=0.0, show_boxes=False)
    changed_columns = np.flatnonzero((out[20:40] != 100).any(axis=(0, 2)))  # the label strip above the mask
    assert changed_columns.min() < 100 and changed_columns.max() == 127


def test_masks_of_another_size_are_rejected():
    with pytest.raises(ValueError, match="masks are"):
        draw_instances(_image(64, 64), _two_instances([0.9, 0.9]), CLASS_NAMES)


def test_save_overlay_writes_a_readable_png(tmp_path):
    image = _image()
    path = save_overlay(tmp_path / "deep" / "dir" / "overlay.png", image, _two_instances([0.9, 0.8]), CLASS_NAMES)
    read = np.asarray(Image.open(path))
    assert read.shape == (96, 128, 3)
    assert np.array_equal(read, draw_instances(image, _two_instances([0.9, 0.8]), CLASS_NAMES))


def test_side_by_side_has_one_titled_panel_per_entry(tmp_path):
    image = _image()
    panels = {"ground truth": _two_instances(None), "teacher": _two_instances([0.9, 0.8]),
              "student": replace(Instances.empty(96, 128), scores=torch.zeros(0))}
    path = save_side_by_side(tmp_path / "sbs.png", image, panels, CLASS_NAMES)
    sheet = np.asarray(Image.open(path))
    title_height = sheet.shape[0] - 96
    gap = (sheet.shape[1] - 3 * 128) // 2
    assert 8 < title_height < 40 and 0 < gap < 20
    student = sheet[title_height:, 2 * (128 + gap):]
    assert np.array_equal(student, image)  # empty panel: the plain image
    teacher = sheet[title_height:, 128 + gap:2 * 128 + gap]
    assert np.array_equal(teacher, draw_instances(image, panels["teacher"], CLASS_NAMES))
    assert (sheet[:title_height, :128] < 128).any()  # title text is dark on white
