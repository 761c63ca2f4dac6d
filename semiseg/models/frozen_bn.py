"""Batch norm with fixed statistics and affine parameters (detectron2's FrozenBatchNorm2d).

The four tensors are buffers named like `nn.BatchNorm2d`'s (`weight`, `bias`, `running_mean`,
`running_var`), so torchvision and detectron2 state dicts load into it unchanged, and an EMA
teacher that copies float buffers copies them too.
"""
from __future__ import annotations

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """`y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`, per channel, never updated.

    x: [B, C, H, W] -> [B, C, H, W]
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A BatchNorm2d state dict also carries a step counter that frozen statistics do not need.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d | nn.SyncBatchNorm) -> "FrozenBatchNorm2d":
        """A frozen copy of a (Sync)BatchNorm's current statistics and affine parameters."""
        frozen = cls(bn.num_features, eps=bn.eps)
        if bn.affine:
            frozen.weight = bn.weight.detach().clone()
            frozen.bias = bn.bias.detach().clone()
        if bn.track_running_stats:
            frozen.running_mean = bn.running_mean.clone()
            frozen.running_var = bn.running_var.clone()
        return frozen


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d / SyncBatchNorm inside `module` by a FrozenBatchNorm2d (in place).

    Returns the module itself, or a FrozenBatchNorm2d when `module` is a batch norm.
    """
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return FrozenBatchNorm2d.from_batchnorm(module)
    for name, child in module.named_children():
        frozen = freeze_batchnorm(child)
        if frozen is not child:
            setattr(module, name, frozen)
    return module
