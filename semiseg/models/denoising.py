"""Denoising (DN) queries of Mask DINO (DN-DETR style, no contrastive negatives).

In training, every ground-truth object is copied into `G = dn_num // max_objects` groups; each copy
gets a noised label (replaced by a random class with probability `noise_scale / 2`, which may
redraw the same class) and a noised box (centre moved by up to `noise_scale * size / 2`, size
scaled by a factor in [1 - noise_scale, 1 + noise_scale], clamped to [0, 1]). The decoder must
reconstruct the clean object from each copy. The P = G * max_objects DN queries are placed before
the Q matching queries; slot `g * max_objects + j` of an image holds its object j in group g, and
slots of images with fewer objects stay empty (content 0, anchor box (0.5, 0.5, 0.5, 0.5)).

The self-attention mask keeps the matching queries blind to every DN query and each DN group
blind to the other groups, so the matching outputs are the same with and without DN. A batch
without objects, or one whose largest image has more than `dn_num` objects, gets no DN queries
(the reference behaviour). The random draws can be passed in (`DenoisingNoise`) to reproduce a
reference run exactly; otherwise they are drawn in the reference's order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from semiseg.models.box_ops import inverse_sigmoid


@dataclass
class DenoisingNoise:
    """The random draws of one DN construction, for N = G * (objects in the batch) noised copies.

    label_p:   [N] uniform in [0, 1); copy i gets a new label where label_p[i] < noise_scale / 2
    new_label: [k] long in [0, num_classes), the new labels of those k copies, in order
    box:       [N, 4] uniform in [0, 1); the box offset is (2 * box - 1) * (w/2, h/2, w, h) * noise_scale
    """

    label_p: torch.Tensor
    new_label: torch.Tensor
    box: torch.Tensor

    @classmethod
    def draw(cls, num_copies: int, num_classes: int, flip_prob: float, device: torch.device,
             generator: torch.Generator | None = None) -> "DenoisingNoise":
        """Draw in the reference's order: label_p, then new_label, then box."""
        label_p = torch.rand(num_copies, device=device, generator=generator)
        num_flipped = int((label_p < flip_prob).sum())
        new_label = torch.randint(0, num_classes, (num_flipped,), device=device, generator=generator)
        box = torch.rand(num_copies, 4, device=device, generator=generator)
        return cls(label_p, new_label, box)


@dataclass
class DenoisingQueries:
    """DN inputs of the decoder for one batch.

    content:     [B, P, D] label embeddings of the noised labels (0 in empty slots)
    anchors:     [B, P, 4] logit-space noised cxcywh boxes (0 in empty slots)
    attn_mask:   [P + Q, P + Q] bool, True where a query may not attend to another
    num_groups:  G
    group_size:  objects per group = the largest number of objects in one image
    """

    content: torch.Tensor
    anchors: torch.Tensor
    attn_mask: torch.Tensor
    num_groups: int
    group_size: int

    @property
    def num_queries(self) -> int:
        """P = num_groups * group_size."""
        return self.num_groups * self.group_size

    def indices(self, num_objects: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed DN assignment per image: (query slots g * group_size + j, object ids j),
        group-major, for g < G and j < the image's number of objects."""
        device = self.content.device
        result = []
        for n in num_objects:
            objects = torch.arange(n, device=device).repeat(self.num_groups)
            groups = torch.arange(self.num_groups, device=device).repeat_interleave(n)
            result.append((groups * self.group_size + objects, objects))
        return result


def denoising_attn_mask(num_groups: int, group_size: int, num_queries: int, device: torch.device) -> torch.Tensor:
    """[P + Q, P + Q] bool (True = blocked): matching rows block all DN columns, DN groups block
    each other, DN rows see the matching queries."""
    pad = num_groups * group_size
    total = pad + num_queries
    group = torch.arange(total, device=device) // group_size
    is_dn = torch.arange(total, device=device) < pad
    other_group = group[:, None] != group[None, :]
    return is_dn[None, :] & (~is_dn[:, None] | other_group)


def build_denoising_queries(
    labels: Sequence[torch.Tensor],
    boxes: Sequence[torch.Tensor],
    label_enc: nn.Embedding,
    num_queries: int,
    dn_num: int,
    noise_scale: float,
    noise: DenoisingNoise | None = None,
    generator: torch.Generator | None = None,
) -> DenoisingQueries | None:
    """DN queries for a batch, or None when it has no object or more than `dn_num` in one image.

    labels: B x [n_b] long; boxes: B x [n_b, 4] normalised cxcywh (relative to the padded canvas).
    label_enc: the class embedding (num_classes x D) that turns noised labels into content.
    noise: the random draws to use (shapes checked); drawn with `generator` when None.
    """
    num_objects = [int(n.shape[0]) for n in labels]
    group_size = max(num_objects, default=0)
    num_groups = dn_num // group_size if group_size > 0 else 0
    if num_groups == 0:
        return None
    device = label_enc.weight.device
    batch_size, hidden_dim = len(labels), label_enc.embedding_dim
    clean_labels = torch.cat([t.to(device) for t in labels]).long().repeat(num_groups)  # [N], group-major
    clean_boxes = torch.cat([t.to(device) for t in boxes]).float().repeat(num_groups, 1)  # [N, 4]
    noised_labels, noised_boxes = clean_labels, clean_boxes
    if noise_scale > 0:
        flip_prob = noise_scale * 0.5
        if noise is None:
            noise = DenoisingNoise.draw(len(clean_labels), label_enc.num_embeddings, flip_prob, device, generator)
        flipped = torch.nonzero(noise.label_p.to(device) < flip_prob).view(-1)
        if noise.label_p.shape != clean_labels.shape or noise.box.shape != clean_boxes.shape \
                or noise.new_label.shape != flipped.shape:
            raise ValueError(f"denoising noise shapes {tuple(noise.label_p.shape)}, {tuple(noise.new_label.shape)}, "
                             f"{tuple(noise.box.shape)} do not fit {len(clean_labels)} copies ({len(flipped)} flipped)")
        noised_labels = clean_labels.scatter(0, flipped, noise.new_label.to(device).long())
        half_wh = clean_boxes[:, 2:] / 2
        scale = torch.cat([half_wh, clean_boxes[:, 2:]], dim=1)  # (w/2, h/2, w, h)
        offsets = (noise.box.to(device) * 2 - 1.0) * scale
        noised_boxes = (clean_boxes + offsets * noise_scale).clamp(min=0.0, max=1.0)

    image = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(num_objects)])
    slot = torch.cat([torch.arange(n, device=device) for n in num_objects])
    image = image.repeat(num_groups)
    slot = (slot.repeat(num_groups).view(num_groups, -1)
            + group_size * torch.arange(num_groups, device=device)[:, None]).view(-1)
    pad = num_groups * group_size
    content = label_enc.weight.new_zeros(batch_size, pad, hidden_dim)
    anchors = label_enc.weight.new_zeros(batch_size, pad, 4)
    content = content.index_put((image, slot), label_enc(noised_labels))
    anchors = anchors.index_put((image, slot), inverse_sigmoid(noised_boxes))
    attn_mask = denoising_attn_mask(num_groups, group_size, num_queries, device)
    return DenoisingQueries(content, anchors, attn_mask, num_groups, group_size)
