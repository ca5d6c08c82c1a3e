"""LPMFlow's training objective as released (``utils_training/optimize.py``,
``data/keypoint_to_flow.py``; spec sections 3.2 and 4), pure functions on tensors:
``L = EPE(flow, pseudo-dense flow) + w(epoch) * InfoNCE on the replaced source tokens``.

- :func:`replace_tokens`: in training, ``count`` of the ``topk`` source patch tokens most like the
  two CLS tokens are replaced by ``stopgrad(src CLS + trg CLS)``; their patch indices are returned.
- :func:`neighbour_mean`, :func:`info_nce`, :func:`contrastive_loss`: each replaced token's joint
  encoder output should match the (detached) mean of its in-grid 8-neighbours' outputs, against the
  other replaced tokens of the same pair as negatives (the released ``InfoNCE(negative_mode='paired')``).
- :func:`released_flow_target`: the released pseudo-dense flow on a ``F x F`` cell grid: a cell is
  supervised by every valid source keypoint within ``halfwidth`` of its centre (both axes,
  inclusive); its value is (target of the highest-index such keypoint - mean of their sources) /
  stride. The mask is explicit: a zero displacement is supervised (the released code drops it).
- :func:`epe_loss`: the mean end-point error over the supervised cells of the whole batch, in cells.

Losses are computed in float32 with autocast off and are 0, still connected to the graph, when
nothing is supervised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sm_model.matching import without_autocast


def _l2norm(x: Tensor) -> Tensor:
    """The released ``FeatureL2Norm`` over the last dim: ``x / sqrt(sum(x^2) + 1e-6)``."""
    return x / (x.square().sum(dim=-1, keepdim=True) + 1e-6).sqrt()


def replace_tokens(
    src: Tensor, trg: Tensor, topk: int, count: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Training-time token replacement on the source backbone tokens (spec 3.2).

    ``src``, ``trg``: ``[B, 1+n, C]``, CLS first. Per pair, ``heat_i = cos(src_i, src_cls) +
    cos(src_i, trg_cls)`` over the ``n`` patch tokens; ``count`` of the ``topk`` hottest patches
    (``torch.topk`` order) are drawn uniformly without replacement (``torch.randperm`` with
    ``generator``) and replaced by ``src_cls + trg_cls``, detached. Every other token keeps its
    gradient. Returns ``(tokens [B, 1+n, C], index [B, count])``, ``index`` the 0-based patch
    indices (token index - 1) of the replaced tokens, long."""
    batch, tokens, _ = src.shape
    if not 0 <= count <= topk <= tokens - 1:
        raise ValueError(f"need 0 <= count ({count}) <= topk ({topk}) <= patch tokens ({tokens - 1})")
    if count == 0:
        return src, torch.zeros(batch, 0, dtype=torch.long, device=src.device)
    with torch.no_grad():
        patches = _l2norm(src[:, 1:].float())  # [B, n, C]
        heat = (patches * _l2norm(src[:, :1].float())).sum(-1) + (patches * _l2norm(trg[:, :1].float())).sum(-1)
        top = heat.topk(topk, dim=1).indices  # [B, topk]
        # One draw per pair, as the released per-pair random.sample, but from torch's RNG so a seed
        # reproduces it; randperm must run on the generator's own device.
        device = src.device if generator is None else generator.device
        draws = torch.stack([torch.randperm(topk, generator=generator, device=device)[:count] for _ in range(batch)])
        index = top.gather(1, draws.to(src.device))  # [B, count]
        replacement = src[:, :1] + trg[:, :1]  # [B, 1, C], built without grad: a stopgrad
        replaced = torch.zeros(batch, tokens, dtype=torch.bool, device=src.device).scatter_(1, index + 1, True)
    # torch.where, not an in-place write: gradient 1 to every kept token, 0 to the replaced ones.
    return torch.where(replaced[..., None], replacement, src), index


@torch.no_grad()
def neighbour_mean(patches: Tensor, index: Tensor, grid: int) -> Tensor:
    """The mean of the in-grid 8-neighbours (3 at a corner, 5 on an edge, 8 inside) of each indexed
    patch, detached. ``patches``: ``[B, n, C]``, ``n = grid * grid`` row-major; ``index``: ``[B, L]``
    0-based patch indices. Returns ``[B, L, C]`` float32."""
    batch, n, channels = patches.shape
    if n != grid * grid:
        raise ValueError(f"{n} patches do not make a {grid} x {grid} grid")
    ring = torch.ones(1, 1, 3, 3, device=patches.device)
    ring[..., 1, 1] = 0  # the 8 neighbours, not the patch itself
    with without_autocast(patches.device.type):
        maps = patches.float().transpose(1, 2).reshape(batch * channels, 1, grid, grid)
        sums = F.conv2d(maps, ring, padding=1).view(batch, channels, n)  # zero padding: out-of-grid adds 0
        counts = F.conv2d(torch.ones(1, 1, grid, grid, device=patches.device), ring, padding=1).view(1, 1, n)
        means = (sums / counts.clamp_min(1)).transpose(1, 2)  # [B, n, C]
    return means.gather(1, index[..., None].expand(-1, -1, channels))


def info_nce(query: Tensor, positive: Tensor, temperature: float) -> Tensor:
    """InfoNCE with the other queries of the same pair as negatives.

    ``query``, ``positive``: ``[B, L, C]``. With L2-normalised vectors, for each pair ``b`` and each
    ``i``: ``logits = [q_i . p_i, q_i . q_j (j != i)] / temperature``, ``loss_i`` the cross-entropy
    with target 0; the mean over ``i`` per pair, then over pairs. A 0-dim float32 tensor: 0 for
    ``L == 1`` (a single logit), and 0 connected to ``query`` for ``L == 0``."""
    batch, length, _ = query.shape
    if batch * length == 0:
        return query.float().sum() * 0
    with without_autocast(query.device.type):
        queries = F.normalize(query.float(), dim=-1)
        positives = F.normalize(positive.float(), dim=-1)
        positive_logit = (queries * positives).sum(-1, keepdim=True)  # [B, L, 1]
        similarity = queries @ queries.transpose(1, 2)  # [B, L, L]
        others = ~torch.eye(length, dtype=torch.bool, device=query.device)
        negative_logits = similarity[:, others].view(batch, length, length - 1)  # row i without j = i
        logits = torch.cat((positive_logit, negative_logits), dim=-1) / temperature  # [B, L, L]
        target = torch.zeros(batch * length, dtype=torch.long, device=query.device)
        # Every pair has the same L, so the mean over all (b, i) is the mean of the per-pair means.
        return F.cross_entropy(logits.flatten(0, 1), target)


def contrastive_loss(src_tokens: Tensor, index: Tensor, grid: int, temperature: float) -> Tensor:
    """The self-contrastive loss on replaced tokens (spec 4.3). ``src_tokens``: ``[B, 1+n, C]``, the
    joint encoder's source output, CLS first; ``index``: ``[B, L]`` the replaced 0-based patch
    indices. Queries are the replaced tokens' outputs, positives :func:`neighbour_mean` of the
    patch outputs, negatives the other queries. A 0-dim float32 tensor."""
    patches = src_tokens[:, 1:]  # [B, n, C]
    query = patches.gather(1, index[..., None].expand(-1, -1, patches.shape[-1]))  # [B, L, C]
    return info_nce(query, neighbour_mean(patches, index, grid), temperature)


@torch.no_grad()
def released_flow_target(
    src_kps: Tensor, trg_kps: Tensor, valid: Tensor, flow_side: int, stride: float, halfwidth: float
) -> tuple[Tensor, Tensor]:
    """The released pseudo-dense ground-truth flow (``KeypointToFlow``), for any grid.

    ``src_kps``, ``trg_kps``: ``[B, N, 2]`` (x, y) input pixels; ``valid``: ``[B, N]`` bool. Cell
    ``(i, j)`` of the ``F x F`` grid (``F = flow_side``) has its centre at ``(stride * j + stride / 2,
    stride * i + stride / 2)`` px; a valid source keypoint reaches it when within ``halfwidth`` px of
    it in both axes (inclusive). Its value is ``(trg of the highest-index reaching keypoint - mean of
    the reaching sources) / stride`` (the released last-write-wins on CPU), in cells. Returns
    ``(flow [B, 2, F, F] float32, channel 0 = x, mask [B, F, F] bool)``; ``flow`` is 0 outside
    ``mask``."""
    batch, count = valid.shape
    device = valid.device
    flow = torch.zeros(batch, 2, flow_side, flow_side, device=device)
    if count == 0:
        return flow, torch.zeros(batch, flow_side, flow_side, dtype=torch.bool, device=device)
    src = torch.where(valid[..., None], src_kps.float(), 0.0)  # padding may be NaN or -1
    trg = torch.where(valid[..., None], trg_kps.float(), 0.0)
    centres = torch.arange(flow_side, dtype=torch.float32, device=device) * stride + stride / 2  # [F]
    near = (src[..., None] - centres).abs() <= halfwidth  # [B, N, 2, F]: x vs columns, y vs rows
    reach = valid[..., None, None] & near[:, :, 1, :, None] & near[:, :, 0, None, :]  # [B, N, F(i), F(j)]
    hits = reach.sum(dim=1)  # [B, F, F]
    mask = hits > 0
    with without_autocast(device.type):
        source_mean = torch.einsum("bnij,bnc->bcij", reach.float(), src) / hits.clamp_min(1)[:, None]
    keypoint = torch.arange(count, device=device).view(1, count, 1, 1)
    last = torch.where(reach, keypoint, -1).amax(dim=1).clamp_min(0)  # [B, F, F]
    last_trg = trg.gather(1, last.view(batch, -1, 1).expand(-1, -1, 2))  # [B, F*F, 2]
    last_trg = last_trg.transpose(1, 2).reshape(batch, 2, flow_side, flow_side)
    flow = torch.where(mask[:, None], (last_trg - source_mean) / stride, 0.0)
    return flow, mask


def epe_loss(flow: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean end-point error ``||flow - target||_2`` over the cells of ``mask`` in the whole batch.
    ``flow``, ``target``: ``[B, 2, F, F]``; ``mask``: ``[B, F, F]`` bool. A 0-dim float32 tensor, 0
    (connected to ``flow``) for an empty mask."""
    with without_autocast(flow.device.type):
        error = torch.linalg.vector_norm(flow.float() - target.float(), dim=1)  # [B, F, F]
        return torch.where(mask, error, 0.0).sum() / mask.sum().clamp_min(1)
