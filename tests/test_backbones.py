"""Backbones: shapes and strides of every family, Swin parity with transformers' Swin, freezing,
FrozenBatchNorm2d, the DINOv2 patch-14 mapping, and config errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from semiseg.errors import CheckpointError, ConfigError
from semiseg.models.backbones import BackboneConfig, build_backbone
from semiseg.models.backbones.swin import SwinBackbone
from semiseg.models.frozen_bn import FrozenBatchNorm2d, freeze_batchnorm
from semiseg.weights import load_checkpoint_file, save_safetensors_atomic

STAGES = ("res2", "res3", "res4", "res5")


def _check_pyramid(backbone, x: torch.Tensor, padded_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    features = backbone(x)
    assert list(features) == list(STAGES)
    assert backbone.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    for name, feature in features.items():
        stride = backbone.strides[name]
        expected = (x.shape[0], backbone.out_channels[name], padded_hw[0] // stride, padded_hw[1] // stride)
        assert feature.shape == expected
        assert torch.isfinite(feature).all()
    return features


def _randomize_batchnorms(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = module.running_mean.numel()
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def test_tiny_resnet_shapes_default_bn_and_gradients():
    backbone = build_backbone(BackboneConfig(name="tiny_resnet"))
    assert backbone.out_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())  # trained from scratch: plain BN
    features = _check_pyramid(backbone, torch.randn(2, 3, 128, 96), (128, 96))
    sum(f.mean() for f in features.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())


def test_tiny_resnet_learns_a_toy_task_from_scratch():
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="tiny_resnet"))
    head = nn.Linear(128, 2)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8) % 2
    images[labels == 1, :, 8:24, 8:24] += 2.0  # class 1 has a bright square
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(10):
        logits = head(backbone(images)["res5"].mean(dim=(2, 3)))
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_resnet50_has_detectron2_names_and_shapes():
    backbone = build_backbone(BackboneConfig(name="resnet50")).eval()
    names = set(backbone.state_dict())
    for name in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.shortcut.weight",
                 "res2.0.shortcut.norm.bias", "res3.3.conv2.norm.weight", "res4.5.conv3.weight",
                 "res5.2.conv3.norm.running_mean"):
        assert name in names
    assert not any("num_batches_tracked" in n or n.startswith(("fc.", "layer")) for n in names)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules()) == 53  # 1 stem + 16 x 3 + 4 shortcuts
    assert backbone.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    with torch.no_grad():
        _check_pyramid(backbone, torch.randn(1, 3, 64, 96), (64, 96))


def test_resnet_stride_in_1x1_moves_the_stride_to_the_first_conv():
    default = build_backbone(BackboneConfig(name="resnet50", norm="bn")).res3[0]
    assert (default.conv1.stride, default.conv2.stride) == ((1, 1), (2, 2))  # torchvision / R-50.pkl layout
    assert isinstance(default.conv1.norm, nn.BatchNorm2d)
    msra = build_backbone(BackboneConfig(name="resnet50", stride_in_1x1=True)).res3[0]
    assert (msra.conv1.stride, msra.conv2.stride) == ((2, 2), (1, 1))


def test_freeze_at_freezes_stem_and_first_stages_and_their_batchnorms():
    backbone = build_backbone(BackboneConfig(name="tiny_resnet", norm="bn", freeze_at=2))
    for part in ("stem", "res2"):
        module = getattr(backbone, part)
        assert not any(p.requires_grad for p in module.parameters())
        assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in module.modules())
    for part in ("res3", "res4", "res5"):
        module = getattr(backbone, part)
        assert all(p.requires_grad for p in module.parameters())
        assert any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    nothing_frozen = build_backbone(BackboneConfig(name="tiny_resnet", freeze_at=0))
    assert all(p.requires_grad for p in nothing_frozen.parameters())
    all_frozen = build_backbone(BackboneConfig(name="tiny_resnet", freeze_at=5))
    assert not any(p.requires_grad for p in all_frozen.parameters())


def test_frozen_batchnorm_matches_eval_batchnorm_and_loads_its_state():
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(8)
    _randomize_batchnorms(bn, g)
    bn.eval()
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked is accepted and dropped
    x = torch.randn(2, 8, 5, 7, generator=g)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(FrozenBatchNorm2d.from_batchnorm(bn)(x), bn(x), rtol=1e-5, atol=1e-6)
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(frozen.parameters()) == []
    torch.testing.assert_close(FrozenBatchNorm2d(8)(x), x, rtol=0, atol=1e-6)  # default is the identity


def test_freeze_batchnorm_replaces_nested_bn_and_syncbn():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.SyncBatchNorm(4)))
    model = freeze_batchnorm(model)
    assert isinstance(model[1], FrozenBatchNorm2d) and isinstance(model[2][0], FrozenBatchNorm2d)
    assert isinstance(freeze_batchnorm(nn.BatchNorm2d(3)), FrozenBatchNorm2d)


def _hf_swin_to_official_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' SwinBackbone names -> official Swin / Mask2Former names (merging at stage end)."""
    renames = [("swin.", ""), ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
               ("embeddings.norm", "patch_embed.norm"), ("encoder.layers", "layers"),
               ("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("attention.o_proj", "attn.proj"),
               ("attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table")]
    out = {}
    for name, value in hf_state.items():
        for old, new in renames:
            name = name.replace(old, new)
        if name.startswith("hidden_states_norms.stage"):
            stage = int(name[len("hidden_states_norms.stage")]) - 1
            name = f"norm{stage}." + name.rsplit(".", 1)[1]
        out[name] = value
    for name in [n for n in out if ".attention.q_proj." in n]:
        parts = [out.pop(name.replace("q_proj", kind)) for kind in ("q_proj", "k_proj", "v_proj")]
        out[name.replace("attention.q_proj", "attn.qkv")] = torch.cat(parts, dim=0)
    return out


def test_swin_matches_transformers_swin_backbone_with_official_weights():
    from timm.models.swin_transformer import SwinTransformer
    from transformers import SwinBackbone as HFSwinBackbone
    from transformers import SwinConfig

    torch.manual_seed(0)
    hf = HFSwinBackbone(SwinConfig(image_size=128, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2],
                                   num_heads=[1, 2, 2, 4], window_size=3, drop_path_rate=0.0,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()  # make the relative position bias matter
    net = SwinTransformer(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3, num_classes=0,
                          always_partition=True, strict_img_size=False, drop_path_rate=0.0)
    ours = SwinBackbone(net).eval()
    official = _hf_swin_to_official_names(hf.state_dict())
    assert "layers.0.downsample.reduction.weight" in official  # merging at the end of stage 0 ...
    ours.load_pretrained({f"backbone.{k}": v for k, v in official.items()}, "hf-swin")
    assert "layers.0.downsample.reduction.weight" not in ours.state_dict()  # ... moved to the start of stage 1
    # 128 x 160: no stage size is a multiple of the window 3, so padding and the shift mask are exercised.
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        expected = hf(x).feature_maps
        features = _check_pyramid(ours, x, (128, 160))
    for name, reference in zip(STAGES, expected):
        torch.testing.assert_close(features[name], reference, rtol=1e-4, atol=1e-4)


def test_swin_tiny_by_name_shapes_and_no_decay_hint():
    backbone = build_backbone(BackboneConfig(name="swin_tiny", freeze_at=2)).eval()
    assert backbone.out_channels == {"res2": 96, "res3": 192, "res4": 384, "res5": 768}
    assert "relative_position_bias_table" in backbone.no_weight_decay_keywords()
    assert not any(p.requires_grad for p in backbone.patch_embed.parameters())
    assert not any(p.requires_grad for p in backbone.layers[0].parameters())
    assert all(p.requires_grad for p in backbone.layers[1].parameters())
    with torch.no_grad():
        _check_pyramid(backbone, torch.randn(1, 3, 40, 70), (64, 96))  # padded up to multiples of 32


def test_vit_small_simple_feature_pyramid():
    backbone = build_backbone(BackboneConfig(name="vit_small", pyramid_channels=32))
    assert backbone.out_channels == {name: 32 for name in STAGES}
    assert backbone.pixel_mean == (127.5, 127.5, 127.5)  # timm's augreg ViTs expect 0.5 mean / std
    features = _check_pyramid(backbone, torch.randn(1, 3, 64, 96), (64, 96))
    sum(f.mean() for f in features.values()).backward()
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []  # DDP needs no unused parameters


def test_dinov2_patch14_grid_is_the_stride16_grid_and_original_weights_load(tmp_path):
    backbone = build_backbone(BackboneConfig(name="dinov2_small", freeze_at=2, pyramid_channels=32)).eval()
    assert not any(p.requires_grad for p in backbone.net.parameters())
    assert all(p.requires_grad for p in backbone.pyramid.parameters())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = _check_pyramid(backbone, x, (64, 96))
        # res4 is the ViT's patch map on the 4 x 6 grid of the input resized to 56 x 84 (14 px per cell)
        resized = nn.functional.interpolate(x, size=(56, 84), mode="bilinear", align_corners=False)
        (tokens,) = backbone.net.forward_intermediates(resized, indices=1, norm=True, intermediates_only=True)
    assert tokens.shape[-2:] == (4, 6)
    torch.testing.assert_close(backbone.pyramid.simfp_4(tokens), features["res4"])

    # A file in the released DINOv2 layout (with `mask_token`) initialises the ViT, not the pyramid.
    original = {name: value + 1.0 for name, value in backbone.net.state_dict().items()}
    original["mask_token"] = torch.zeros(1, backbone.net.embed_dim)
    save_safetensors_atomic(original, tmp_path / "dinov2_vits14.safetensors")
    pyramid_before = backbone.pyramid.simfp_2[0].weight.clone()
    backbone.load_pretrained(load_checkpoint_file(tmp_path / "dinov2_vits14.safetensors"), "dinov2_vits14")
    torch.testing.assert_close(backbone.net.blocks[3].attn.qkv.weight, original["blocks.3.attn.qkv.weight"])
    torch.testing.assert_close(backbone.net.pos_embed, original["pos_embed"])
    torch.testing.assert_close(backbone.pyramid.simfp_2[0].weight, pyramid_before)


@pytest.mark.parametrize("cfg, message", [
    (BackboneConfig(name="resnet5O"), "unknown backbone"),
    (BackboneConfig(name="swin_tiny", norm="bn"), "only ResNets take a norm"),
    (BackboneConfig(name="tiny_resnet", norm="group"), "unknown norm"),
    (BackboneConfig(name="tiny_resnet", freeze_at=6), "outside 0..5"),
    (BackboneConfig(name="resnet50", weights="r50.pkl", download=True), "not both"),
])
def test_config_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone(cfg)


def test_missing_weights_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such weights file"):
        build_backbone(BackboneConfig(name="tiny_resnet", weights=tmp_path / "missing.pkl"))
