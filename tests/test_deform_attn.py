"""Multi-scale deformable attention: the grid_sample core against a naive loop, the layer's geometry."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from semiseg.errors import ConfigError
from semiseg.models.deform_attn import MSDeformAttn, ms_deform_attn_core

SHAPES = [(3, 4), (2, 5)]


def naive_deform_attn(value, shapes, locations, weights):
    """Bilinear sampling written out point by point (pixel centres at (i + 0.5) / size, zeros outside)."""
    b, _, m, d = value.shape
    _, q, _, n_levels, n_points, _ = locations.shape
    out = torch.zeros(b, q, m, d, dtype=torch.float64)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)

    def pixel(bi, level, y, x, mi):
        h, w = shapes[level]
        if 0 <= y < h and 0 <= x < w:
            return value[bi, starts[level] + y * w + x, mi].double()
        return torch.zeros(d, dtype=torch.float64)

    for bi in range(b):
        for qi in range(q):
            for mi in range(m):
                for li, (h, w) in enumerate(shapes):
                    for pi in range(n_points):
                        x = locations[bi, qi, mi, li, pi, 0].item() * w - 0.5
                        y = locations[bi, qi, mi, li, pi, 1].item() * h - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        fx, fy = x - x0, y - y0
                        sample = ((1 - fx) * (1 - fy) * pixel(bi, li, y0, x0, mi)
                                  + fx * (1 - fy) * pixel(bi, li, y0, x0 + 1, mi)
                                  + (1 - fx) * fy * pixel(bi, li, y0 + 1, x0, mi)
                                  + fx * fy * pixel(bi, li, y0 + 1, x0 + 1, mi))
                        out[bi, qi, mi] += weights[bi, qi, mi, li, pi].double() * sample
    return out.reshape(b, q, m * d)


def random_inputs(seed=0, b=2, q=5, m=2, d=3, n_points=2):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, m, d, generator=g)
    locations = torch.rand(b, q, m, len(SHAPES), n_points, 2, generator=g) * 1.4 - 0.2  # some fall outside
    weights = torch.rand(b, q, m, len(SHAPES), n_points, generator=g)
    return value, locations, weights


def test_core_matches_naive_loop():
    value, locations, weights = random_inputs()
    ours = ms_deform_attn_core(value, SHAPES, locations, weights)
    assert ours.shape == (2, 5, 6)
    torch.testing.assert_close(ours.double(), naive_deform_attn(value, SHAPES, locations, weights), atol=1e-5, rtol=1e-5)


def test_core_matches_transformers_reference():
    modeling = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    value, locations, weights = random_inputs(seed=1)
    expected = modeling.multi_scale_deformable_attention(value, SHAPES, locations, weights)
    # not bitwise: semiseg sums level by level (faster), transformers over all levels at once
    torch.testing.assert_close(ms_deform_attn_core(value, SHAPES, locations, weights), expected, atol=1e-6, rtol=1e-6)


def test_init_offsets_point_along_head_directions():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 looks along +x, head 1 along +y; point k sits at distance k + 1 on every level
    torch.testing.assert_close(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[1, 0, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    assert bias.abs().amax(-1).flatten(0, 1).eq(torch.tensor([1.0, 2.0, 3.0])).all()
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0


def test_box_reference_equals_point_reference_with_matching_scale():
    torch.manual_seed(0)
    h, w, n_points = 4, 6, 2
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=n_points)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    query, value = torch.randn(2, 3, 16), torch.randn(2, h * w, 16)
    centres = torch.rand(2, 3, 1, 2)
    # offset / P * size * 0.5 == offset / (w, h) when size = 2P / (w, h)
    boxes = torch.cat([centres, torch.tensor([2 * n_points / w, 2 * n_points / h]).expand(2, 3, 1, 2)], -1)
    torch.testing.assert_close(attn(query, boxes, value, [(h, w)]), attn(query, centres, value, [(h, w)]))


def test_padding_mask_hides_padded_values():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    s = sum(h * w for h, w in SHAPES)
    query, value, ref = torch.randn(2, 4, 16), torch.randn(2, s, 16), torch.rand(2, 4, 2, 2)
    padding = torch.zeros(2, s, dtype=torch.bool)
    padding[:, 5:9] = True
    changed = value.clone()
    changed[:, 5:9] += 100.0
    out = attn(query, ref, value, SHAPES, padding)
    torch.testing.assert_close(attn(query, ref, changed, SHAPES, padding), out)
    assert not torch.allclose(attn(query, ref, changed, SHAPES), attn(query, ref, value, SHAPES))


def test_shapes_must_cover_value_tokens():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    with pytest.raises(ValueError, match="do not add up"):
        attn(torch.randn(1, 2, 16), torch.rand(1, 2, 2, 2), torch.randn(1, 7, 16), SHAPES)


@pytest.mark.skipif(importlib.util.find_spec("torch_ms_deform_attn") is not None, reason="kernel installed")
def test_kernel_backend_without_package_is_a_clear_error():
    with pytest.raises(ConfigError, match="torch-ms-deform-attn"):
        MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, backend="kernel")
    with pytest.raises(ConfigError, match="backend"):
        MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, backend="cuda")


def test_kernel_matches_pure_op():
    pytest.importorskip("torch_ms_deform_attn")
    torch.manual_seed(0)
    pure = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    torch.nn.init.normal_(pure.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(pure.attention_weights.weight, std=0.5)
    fast = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, backend="kernel")
    fast.load_state_dict(pure.state_dict())
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, 4, 16, requires_grad=True)
    value, ref = torch.randn(2, s, 16), torch.rand(2, 4, 2, 2)
    out_pure, out_fast = pure(query, ref, value, SHAPES), fast(query, ref, value, SHAPES)
    torch.testing.assert_close(out_fast, out_pure, atol=1e-5, rtol=1e-5)
    (g_pure,) = torch.autograd.grad(out_pure.square().sum(), query)
    (g_fast,) = torch.autograd.grad(out_fast.square().sum(), query)
    torch.testing.assert_close(g_fast, g_pure, atol=1e-4, rtol=1e-4)
