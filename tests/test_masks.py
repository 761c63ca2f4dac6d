"""COCO segmentation decoding/encoding: round trips, agreement with pycocotools, bad input."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as pycoco_mask

from semiseg.data.masks import check_segmentation, decode_segmentation, encode_rle, rle_counts
from semiseg.errors import DataError

# pycocotools (the reference) warns about NumPy 2's copy keyword on every decode.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(lambda hw: arrays(np.bool_, hw))


def column_major_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO counts, written independently of the library: runs of 0, 1, 0, ..."""
    runs, current, length = [], False, 0
    for value in mask.T.ravel():
        if value == current:
            length += 1
        else:
            runs.append(length)
            current, length = value, 1
    runs.append(length)
    return runs


@settings(max_examples=50, deadline=None)
@given(masks)
def test_compressed_rle_round_trip(mask):
    rle = encode_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == list(mask.shape)
    json.dumps(rle)
    decoded = decode_segmentation(rle, *mask.shape)
    assert decoded.dtype == np.bool_ and np.array_equal(decoded, mask)
    assert rle_counts(rle["counts"]).tolist() == column_major_runs(mask)


@settings(max_examples=50, deadline=None)
@given(masks)
def test_uncompressed_rle_round_trip(mask):
    rle = {"size": list(mask.shape), "counts": column_major_runs(mask)}
    assert np.array_equal(decode_segmentation(rle, *mask.shape), mask)
    assert np.array_equal(decode_segmentation(pycoco_mask.frPyObjects(rle, *mask.shape), *mask.shape), mask)


@st.composite
def polygon_sets(draw):
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    point = st.tuples(st.floats(-1.0, w + 1.0), st.floats(-1.0, h + 1.0))  # partly outside the image too
    polygons = draw(st.lists(st.lists(point, min_size=3, max_size=8), min_size=1, max_size=3))
    return h, w, [[v for point in polygon for v in point] for polygon in polygons]


@settings(max_examples=50, deadline=None)
@given(polygon_sets())
def test_polygons_match_pycocotools(case):
    h, w, polygons = case
    expected = pycoco_mask.decode(pycoco_mask.merge(pycoco_mask.frPyObjects(polygons, h, w))).astype(bool)
    assert np.array_equal(decode_segmentation(polygons, h, w), expected)


def test_polygon_rasterises_where_expected():
    mask = decode_segmentation([[1, 1, 5, 1, 5, 4, 1, 4]], 6, 8)
    ys, xs = np.nonzero(mask)
    assert mask.shape == (6, 8) and (xs.min(), xs.max(), ys.min(), ys.max()) == (1, 4, 1, 3)


@pytest.mark.parametrize("segmentation, words", [
    ({"size": [4, 6], "counts": [24]}, "size"),
    ({"size": [4, 5], "counts": [6, 2, 2, 2, 3]}, "sum to 15"),
    ({"size": [4, 5], "counts": [6, 2, 2, 2, 30]}, "sum to 42"),
    ({"size": [4, 5], "counts": [22, -2]}, "negative"),
    ({"size": [4, 5], "counts": "6222"}, "sum to 14"),
    ({"size": [4, 5], "counts": "92203Y"}, "middle"),
    ({"size": [4, 5], "counts": "9 2203"}, "invalid character"),
    ({"size": [4, 5], "counts": [6.0, 14]}, "integers"),
    ({"size": [4, 5], "counts": [[6], [1, 13]]}, "integers"),
    ({"size": [4, 5], "counts": None}, "counts"),
    ({"size": [4, 5], "counts": "a" * 12 + "0"}, "impossibly large"),
    ({"size": [4, 5]}, "counts"),
    ([[1, 1, 4, 1]], "2 points"),
    ([[1, 1, 4, 1, 4]], "odd"),
    ([], "empty"),
    ([[1, 1, 4, 1, 4, "x"]], "non-numeric"),
    ([[1, 1, 4, 1, 4, float("nan")]], "NaN"),
    ([[1, 1, 4, 1, 4, 1e9]], "far outside"),
    ("polygon", "got str"),
])
def test_bad_segmentation_names_source_and_problem(segmentation, words):
    with pytest.raises(DataError, match=words) as info:
        decode_segmentation(segmentation, 4, 5, source="ann.json annotation 7")
    assert str(info.value).startswith("ann.json annotation 7: ")


def test_check_segmentation_accepts_valid_and_rejects_wrong_size():
    check_segmentation([[0, 0, 3, 0, 3, 3]], 4, 5)
    check_segmentation(encode_rle(np.ones((4, 5), bool)), 4, 5)
    with pytest.raises(DataError, match="does not match"):
        check_segmentation(encode_rle(np.ones((5, 4), bool)), 4, 5)
