"""Numerical parity of our Mask2Former with Hugging Face `transformers` (an independent implementation).

A tiny random-weight HF `Mask2FormerForUniversalSegmentation` is built, its weights are copied into
our model through an HF -> official-name map (strict load), and outputs, matcher indices and every
seeded loss term are compared on a non-square batch of two images.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from semiseg.models.mask2former import Mask2Former, Mask2FormerConfig  # noqa: E402
from semiseg.structures import Instances  # noqa: E402

NUM_CLASSES, NUM_QUERIES, DEC_LAYERS, HIDDEN = 5, 10, 4, 64
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)

# HF name (after the prefix) -> official name; applied in order, first match wins.
PIXEL_DECODER_RULES = [
    (r"input_projections\.(.*)", r"input_proj.\1"),
    (r"level_embed", r"transformer.level_embed"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(.*)", r"transformer.encoder.layers.\1.self_attn.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(.*)", r"transformer.encoder.layers.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(.*)", r"transformer.encoder.layers.\1.linear1.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(.*)", r"transformer.encoder.layers.\1.linear2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(.*)", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"mask_projection\.(.*)", r"mask_features.\1"),
    (r"(adapter_\d+|layer_\d+)\.0\.(.*)", r"\1.\2"),
    (r"(adapter_\d+|layer_\d+)\.1\.(.*)", r"\1.norm.\2"),
]
PREDICTOR_RULES = [
    (r"queries_features\.(.*)", r"query_feat.\1"),
    (r"queries_embedder\.(.*)", r"query_embed.\1"),
    (r"level_embed\.(.*)", r"level_embed.\1"),
    (r"input_projections\.(.*)", r"input_proj.\1"),
    (r"decoder\.layernorm\.(.*)", r"decoder_norm.\1"),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(.*)", r"mask_embed.layers.\1.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(.*)", r"transformer_self_attention_layers.\1.self_attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(.*)", r"transformer_self_attention_layers.\1.norm.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.(.*)", r"transformer_cross_attention_layers.\1.multihead_attn.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(.*)", r"transformer_cross_attention_layers.\1.norm.\2"),
    (r"decoder\.layers\.(\d+)\.fc1\.(.*)", r"transformer_ffn_layers.\1.linear1.\2"),
    (r"decoder\.layers\.(\d+)\.fc2\.(.*)", r"transformer_ffn_layers.\1.linear2.\2"),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.(.*)", r"transformer_ffn_layers.\1.norm.\2"),
]
SPLIT_QKV = re.compile(r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(f"no rule for {name}")


def hf_to_official(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Mask2Former state dict -> official (detectron2) names of the whole model."""
    out, qkv = {}, {}
    for key, value in hf_state.items():
        if key.startswith("model.pixel_level_module.encoder."):
            out["backbone.body." + key.removeprefix("model.pixel_level_module.encoder.")] = value
        elif key.startswith("model.pixel_level_module.decoder."):
            name = _rename(key.removeprefix("model.pixel_level_module.decoder."), PIXEL_DECODER_RULES)
            out["sem_seg_head.pixel_decoder." + name] = value
        elif key.startswith("model.transformer_module."):
            name = key.removeprefix("model.transformer_module.")
            match = SPLIT_QKV.fullmatch(name)
            if match:  # separate q/k/v projections -> packed nn.MultiheadAttention in_proj
                layer, which, kind = match.groups()
                qkv.setdefault((layer, kind), {})[which] = value
                continue
            out["sem_seg_head.predictor." + _rename(name, PREDICTOR_RULES)] = value
        elif key.startswith("class_predictor."):
            out["sem_seg_head.predictor.class_embed." + key.removeprefix("class_predictor.")] = value
        elif key == "criterion.empty_weight":
            out[key] = value
        else:
            raise KeyError(f"unexpected HF key {key}")
    for (layer, kind), parts in qkv.items():
        packed = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
        out[f"sem_seg_head.predictor.transformer_self_attention_layers.{layer}.self_attn.in_proj_{kind}"] = packed
    return out


class HFBackbone(nn.Module):
    """Wraps the HF backbone so it returns {"res2".."res5"} like semiseg backbones."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        names = [f"res{i + 2}" for i in range(len(body.channels))]
        self.out_channels = dict(zip(names, body.channels))
        self.strides = {name: 4 * 2 ** i for i, name in enumerate(names)}

    def forward(self, x):
        return dict(zip(self.out_channels, self.body(x).feature_maps))


@pytest.fixture(scope="module")
def models():
    from transformers import Mask2FormerConfig as HFConfig
    from transformers import Mask2FormerForUniversalSegmentation, ResNetConfig

    torch.manual_seed(0)
    hf_cfg = HFConfig(
        backbone_config=ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                     layer_type="basic", out_features=["stage1", "stage2", "stage3", "stage4"]),
        feature_size=HIDDEN, mask_feature_size=HIDDEN, hidden_dim=HIDDEN, num_attention_heads=8,
        encoder_layers=2, encoder_feedforward_dim=128, decoder_layers=DEC_LAYERS, dim_feedforward=128,
        num_queries=NUM_QUERIES, num_labels=NUM_CLASSES, dropout=0.0, pre_norm=False,
        enforce_input_projection=False, common_stride=4, feature_strides=[4, 8, 16, 32],
        train_num_points=1024, oversample_ratio=3.0, importance_sample_ratio=0.75,
        class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1,
        use_auxiliary_loss=True, output_auxiliary_logits=True)
    hf = Mask2FormerForUniversalSegmentation(hf_cfg).eval()
    cfg = Mask2FormerConfig(num_classes=NUM_CLASSES, hidden_dim=HIDDEN, num_queries=NUM_QUERIES, nheads=8,
                            dim_feedforward=128, dec_layers=DEC_LAYERS, enc_layers=2, enc_dim_feedforward=128,
                            conv_dim=HIDDEN, mask_dim=HIDDEN, train_num_points=1024)
    ours = Mask2Former(cfg, HFBackbone(Mask2FormerForUniversalSegmentation(hf_cfg).model.pixel_level_module.encoder))
    ours.load_state_dict(hf_to_official(hf.state_dict()), strict=True)
    return hf, ours.eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 128, 192), generator=g, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(192), indexing="ij")
    masks = [torch.stack([(xx - 40) ** 2 + (yy - 50) ** 2 < 900, (xx > 100) & (yy > 60)]),
             torch.stack([(xx < 90) & (yy < 70), (xx - 150) ** 2 + (yy - 90) ** 2 < 400, yy > 110])]
    targets = [Instances.from_masks(torch.tensor([1, 3]), masks[0]),
               Instances.from_masks(torch.tensor([0, 4, 2]), masks[1])]
    return images, targets


@pytest.fixture(scope="module")
def outputs(models, batch):
    hf, ours = models
    images, _ = batch
    with torch.no_grad():
        theirs = hf((images.float() - MEAN) / STD, output_hidden_states=True)
        mine = ours(images, [(128, 192), (128, 192)])
    return theirs, mine


def test_forward_outputs_match(outputs):
    theirs, mine = outputs
    assert mine["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
    assert mine["pred_masks"].shape == (2, NUM_QUERIES, 32, 48)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine["mask_features"], theirs.pixel_decoder_last_hidden_state, **close)
    assert [f.shape[-2:] for f in mine["multi_scale_features"]] == [(4, 6), (8, 12), (16, 24)]
    for ours_f, hf_f in zip(mine["multi_scale_features"], theirs.pixel_decoder_hidden_states, strict=True):
        torch.testing.assert_close(ours_f, hf_f, **close)
    torch.testing.assert_close(mine["pred_logits"], theirs.class_queries_logits, **close)
    torch.testing.assert_close(mine["pred_masks"], theirs.masks_queries_logits, **close)
    assert len(mine["aux_outputs"]) == DEC_LAYERS - 1 == len(theirs.auxiliary_logits)
    for aux, hf_aux in zip(mine["aux_outputs"], theirs.auxiliary_logits):
        torch.testing.assert_close(aux["pred_logits"], hf_aux["class_queries_logits"], **close)
        torch.testing.assert_close(aux["pred_masks"], hf_aux["masks_queries_logits"], **close)


def test_matcher_indices_match(models, outputs, batch):
    hf, ours = models
    theirs, mine = outputs
    _, targets = batch
    sets = [(mine, theirs.masks_queries_logits, theirs.class_queries_logits)] + [
        (aux, hf_aux["masks_queries_logits"], hf_aux["class_queries_logits"])
        for aux, hf_aux in zip(mine["aux_outputs"], theirs.auxiliary_logits)]
    for ours_out, hf_masks, hf_logits in sets:
        torch.manual_seed(7)
        expected = hf.criterion.matcher(hf_masks, hf_logits, [t.masks.float() for t in targets],
                                        [t.labels for t in targets])
        torch.manual_seed(7)
        got = ours.criterion.matcher(ours_out, targets)
        for (rows, cols), (hf_rows, hf_cols) in zip(got, expected, strict=True):
            assert rows.tolist() == hf_rows.tolist() and cols.tolist() == hf_cols.tolist()
            assert len(rows) == min(NUM_QUERIES, len(cols))


def loss_terms(models, images, targets, seed):
    """(semiseg's loss terms, transformers' loss dict) in train mode, each under `seed` (point sampling)."""
    hf, ours = models
    hf.train()
    ours.train()
    try:
        theirs_out = hf((images.float() - MEAN) / STD, output_hidden_states=True)
        torch.manual_seed(seed)
        theirs = hf.get_loss_dict(theirs_out.masks_queries_logits, theirs_out.class_queries_logits,
                                  [t.masks.float() for t in targets], [t.labels for t in targets],
                                  theirs_out.auxiliary_logits)
        mine_out = ours(images, [(128, 192), (128, 192)])
        torch.manual_seed(seed)
        return ours.loss(mine_out, targets), theirs
    finally:
        hf.eval()
        ours.eval()


def test_every_loss_term_matches_under_the_same_seed(models, batch):
    images, targets = batch
    mine, theirs = loss_terms(models, images, targets, 123)
    expected_keys = {f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ["", *(f"_{i}" for i in range(DEC_LAYERS - 1))]}
    assert set(mine) == expected_keys
    for key, value in mine.items():
        hf_key = key.replace("loss_ce", "loss_cross_entropy")
        torch.testing.assert_close(value, theirs[hf_key], atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    total = sum(mine.values())
    total.backward()
    assert torch.isfinite(total) and total > 0


def test_gradients_match_under_the_same_seed(models, batch):
    """Same loss value is not enough: every parameter's gradient must match HF's too."""
    hf, ours = models
    images, targets = batch
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    hf.train()
    ours.train()
    try:
        theirs_out = hf((images.float() - MEAN) / STD)
        torch.manual_seed(5)
        sum(hf.get_loss_dict(theirs_out.masks_queries_logits, theirs_out.class_queries_logits,
                             [t.masks.float() for t in targets], [t.labels for t in targets],
                             theirs_out.auxiliary_logits).values()).backward()
        mine_out = ours(images, [(128, 192), (128, 192)])
        torch.manual_seed(5)
        sum(ours.loss(mine_out, targets).values()).backward()
    finally:
        hf.eval()
        ours.eval()
    hf_grads = hf_to_official({k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in hf.named_parameters()})
    for name, p in ours.named_parameters():
        expected = hf_grads[name]
        torch.testing.assert_close(p.grad, expected, atol=1e-6 * max(1.0, expected.abs().max().item()), rtol=1e-4,
                                   msg=lambda m, k=name: f"{k}: {m}")


def test_losses_match_with_panoptic_targets(models, batch):
    """Panoptic targets: the things plus one mask per stuff class covering the rest of the image
    (the targets `model.task: panoptic` trains on); every loss term as transformers computes it."""
    images, things = batch
    yy, _ = torch.meshgrid(torch.arange(128), torch.arange(192), indexing="ij")
    targets = []
    for t, stuff_labels in zip(things, ([4, 2], [3])):
        rest = ~t.masks.any(0)
        stuff = [rest & (yy < 64), rest & (yy >= 64)] if len(stuff_labels) == 2 else [rest]
        targets.append(Instances.from_masks(torch.cat([t.labels, torch.tensor(stuff_labels)]),
                                            torch.cat([t.masks, torch.stack(stuff)])))
    mine, theirs = loss_terms(models, images, targets, 5)
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[key.replace("loss_ce", "loss_cross_entropy")], atol=1e-5, rtol=1e-5)
