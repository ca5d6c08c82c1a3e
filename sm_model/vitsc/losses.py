"""ViTSC's training objective (the paper's Sec. 4.3, Eq. 9-11), pure functions on tensors:
``L = epe_weight * EPE(M', pseudo-dense flow) + aux_weight * keypoint triplet loss``.

- :func:`pseudo_flow`: every pixel of the ``(2w+1) x (2w+1)`` square centred at a valid source
  keypoint's rounded position (clipped to the image) gets that keypoint's displacement
  ``q - p``; a pixel in several squares takes the keypoint nearest to it (Euclidean, to the
  sub-pixel ``p``; ties to the lower index). The mask is explicit: a zero displacement is supervised.
- :func:`epe_loss`: the mean end-point error over the supervised pixels of the whole batch.
- :func:`triplet_loss`: all ``N(N-1)`` (anchor, positive, negative) triplets of a pair's valid
  keypoints on L2-normalised features, Euclidean distance, mean per pair, then over pairs with at
  least two valid keypoints.

Every loss is 0, still connected to the graph, when nothing is supervised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def pseudo_flow(src_kps: Tensor, trg_kps: Tensor, valid: Tensor, size: int, halfwidth: int) -> tuple[Tensor, Tensor]:
    """The pseudo-dense ground-truth flow of keypoint pairs (see the module).

    ``src_kps``, ``trg_kps``: ``[B, N, 2]`` input pixels; ``valid``: ``[B, N]`` bool; ``size``: S;
    ``halfwidth``: ``w`` pixels. Returns ``(flow [B, 2, S, S] float32, mask [B, S, S] bool)``;
    ``flow`` is 0 outside ``mask``."""
    batch, count = valid.shape
    device = valid.device
    src = torch.where(valid[..., None], src_kps.float(), 0.0)
    displacement = torch.where(valid[..., None], trg_kps.float() - src, 0.0)
    offsets = torch.arange(-halfwidth, halfwidth + 1, dtype=torch.float32, device=device)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    square = torch.stack((dx, dy), dim=-1).reshape(-1, 2)  # [K, 2]
    pixels = torch.floor(src + 0.5)[:, :, None] + square  # [B, N, K, 2]
    inside = valid[..., None] & ((pixels >= 0) & (pixels <= size - 1)).all(dim=-1)  # [B, N, K]
    distance = torch.linalg.vector_norm(pixels - src[:, :, None], dim=-1)  # [B, N, K]
    image = torch.arange(batch, device=device).view(batch, 1, 1)
    flat = image * size * size + (pixels[..., 1] * size + pixels[..., 0]).clamp(0, size * size - 1).long()
    flat, distance = flat[inside], distance[inside]  # the candidates
    keypoint = torch.arange(count, device=device).view(1, count, 1).expand_as(inside)[inside]
    nearest = torch.full((batch * size * size,), torch.inf, device=device).scatter_reduce(0, flat, distance, "amin")
    winner = distance == nearest[flat]
    first = torch.full((batch * size * size,), count, device=device).scatter_reduce(
        0, flat[winner], keypoint[winner], "amin"
    )
    winner &= keypoint == first[flat]
    flow = torch.zeros(batch * size * size, 2, device=device)
    flow[flat[winner]] = displacement[:, :, None].expand(-1, -1, square.shape[0], -1)[inside][winner]
    mask = torch.zeros(batch * size * size, dtype=torch.bool, device=device)
    mask[flat[winner]] = True
    return flow.view(batch, size, size, 2).permute(0, 3, 1, 2), mask.view(batch, size, size)


def epe_loss(flow: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean end-point error ``||flow - target||_2`` over the pixels of ``mask`` in the whole batch.
    ``flow``, ``target``: ``[B, 2, S, S]``; ``mask``: ``[B, S, S]`` bool. 0 (connected) for an empty mask."""
    error = torch.linalg.vector_norm(flow - target, dim=1)  # [B, S, S]
    return torch.where(mask, error, 0.0).sum() / mask.sum().clamp_min(1)


def triplet_loss(src_features: Tensor, trg_features: Tensor, valid: Tensor, margin: float) -> Tensor:
    """The keypoint triplet loss (the paper's Eq. 10): for each pair, the mean over ordered
    ``(i, j)``, ``j != i``, both valid, of ``max(d(a_i, p_i) - d(a_i, p_j) + margin, 0)`` with
    ``a`` the source and ``p`` the target keypoint features ``[B, N, C]`` L2-normalised and ``d``
    the Euclidean distance; then the mean over pairs with at least two valid keypoints."""
    anchors = F.normalize(src_features.float(), dim=-1, eps=1e-8)
    positives = F.normalize(trg_features.float(), dim=-1, eps=1e-8)
    # The difference form (not 2 - 2 a.p): its gradient stays bounded as a distance goes to 0.
    distance = ((anchors[:, :, None] - positives[:, None]).square().sum(-1) + 1e-12).sqrt()  # [B, N(a), N(p)]
    terms = F.relu(distance.diagonal(dim1=1, dim2=2)[:, :, None] - distance + margin)
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    triplets = valid[:, :, None] & valid[:, None, :] & ~eye
    per_pair = torch.where(triplets, terms, 0.0).sum(dim=(1, 2)) / triplets.sum(dim=(1, 2)).clamp_min(1)
    counted = valid.sum(dim=1) >= 2
    return torch.where(counted, per_pair, 0.0).sum() / counted.sum().clamp_min(1)
