"""ViTSC (kind ``vitsc``): "Bridging the gap between semantic correspondence and robust visual
representation" as its paper describes it (no public code is known; every point where the paper is
silent is a choice recorded in ``sm_model/README.md``, section ViTSC).

encode (a pair-level encoding, :class:`VitscEncoded`)::

    H-Encoder  DINOv2 (``backbone``), last-layer patch tokens        [2B, C, S/14, S/14]
    proj       Linear(C, dim), shared                                [2B, d, t, t]
    cross      ``layers`` interleaved cross-perception layers        F^A', F^B'
    upsample   bilinear to stride 8                                  F~^A, F~^B [B, d, S/8, S/8]
    C          cosine correlation                                    [B, h*h, h, h]
    M          Gaussian-kernel soft-argmax at T = exp(tau), minus the cell centre   [B, 2, h, h]
    L-Encoder  ResNet-18 to layer3 at stride 4                       F_low [2B, 256, S/4, S/4]
    C_low      cos(avgpool2(F_low^A), F_low^B)                       [B, h*h, S/4, S/4]
    C_local    RAFT lookup, radius r, around each coarse match       [B, (2r+1)^2, h, h]
    M'         flow head on up(M) and up(C_local)                    [B, 2, S, S]

match: the coarse :class:`~sm_model.matching.Matches` (the kernel soft-argmax of each keypoint's
cosine row) and the fine :class:`FlowMatches` (``p + M'(p)``, ``M'`` read bilinearly). loss: EPE on
the pseudo-dense flow + the keypoint triplet loss (:mod:`sm_model.vitsc.losses`). The correlation,
kernel, softmax, lookup, flow reads and both losses run in float32 with autocast off; the ViT, the
cross-perception, the L-Encoder and the flow head may run in bfloat16.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sm_model.backbones import build_backbone
from sm_model.config import ModelConfig
from sm_model.localizers import Localization
from sm_model.matcher import MatchModel, check_images, checked_keypoints
from sm_model.matching import Matches, match_keypoints, sample_keypoint_features, without_autocast
from sm_model.pixels import pixels_to_cells
from sm_model.vitsc.config import COARSE_STRIDE, LOW_STRIDE, size_multiple
from sm_model.vitsc.correlation import coarse_flow, cosine_correlation, local_lookup, read_flow
from sm_model.vitsc.cross_perception import CrossPerception
from sm_model.vitsc.losses import epe_loss, pseudo_flow, triplet_loss
from sm_model.vitsc.low_encoder import LowEncoder
from sm_model.vitsc.upsampler import FlowUpsampler


class VitscEncoded(NamedTuple):
    """A batch of pairs encoded by ViTSC: ``flow`` ``M'`` ``[B, 2, S, S]`` (input pixels, float32),
    the enhanced stride-8 maps ``src``, ``trg`` ``[B, d, S/8, S/8]``, the ``coarse_flow`` ``M``
    ``[B, 2, S/8, S/8]`` (input pixels), the ``temperature`` ``T`` (0-dim) and the input ``size`` S."""

    flow: Tensor
    src: Tensor
    trg: Tensor
    coarse_flow: Tensor
    temperature: Tensor
    size: int

    @property
    def batch_size(self) -> int:
        return self.flow.shape[0]


class FlowMatches(NamedTuple):
    """The fine prediction: ``points``, ``scores``, ``stride`` as :class:`~sm_model.matching.Matches`
    (points ``p + M'(p)`` ``[B, N, 2]`` input pixels; the same cosine rows ``[B, N, S/8, S/8]`` as the
    coarse scale, stride 8), and what the loss needs: the full-resolution ``flow`` ``[B, 2, S, S]``,
    the ``src_kps`` read (invalid ones at ``(0, 0)``), the source keypoints' enhanced features
    ``src_features`` ``[B, N, d]`` and the enhanced target map ``trg_map`` ``[B, d, S/8, S/8]``."""

    points: Tensor
    scores: Tensor
    stride: float
    flow: Tensor
    src_kps: Tensor
    src_features: Tensor
    trg_map: Tensor


class ViTSC(MatchModel):
    """The ViTSC model (kind ``vitsc``), built from a :class:`ModelConfig` with
    :class:`~sm_model.vitsc.config.VitscOptions` (see the module).

    ``backbone``: the DINOv2 (:func:`sm_model.backbones.build_backbone`, its fine-tuning applied;
    ``sm_train`` gives it ``backbone_lr``); everything else (``low_encoder``, ``proj``, ``cross``,
    ``log_temperature``, ``upsampler``) is the head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        options = config.options
        self.backbone = build_backbone(config)
        channels = self.backbone.channels[-1]
        self.low_encoder = LowEncoder(options.low_weights) if options.uses_low_encoder else None
        if options.layers:
            self.proj = nn.Linear(channels, options.dim)
            self.cross = CrossPerception(options.dim, options.heads, options.layers)
            nn.init.trunc_normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)
        else:
            self.proj = self.cross = None
        self.log_temperature = nn.Parameter(torch.full((), math.log(options.temperature)))
        self.upsampler = FlowUpsampler(options.upsampler, options.radius)

    @property
    def temperature(self) -> Tensor:
        """The soft-argmax temperature ``T = exp(tau)`` (learned; starts at ``options.temperature``)."""
        return self.log_temperature.exp()

    def encode(self, src: Tensor, trg: Tensor) -> VitscEncoded:
        """The pair-level encoding of ``src``, ``trg`` ``[B, 3, S, S]`` ImageNet-normalised (S a
        multiple of lcm(patch, 8)); both images go through each encoder as one batch of ``2B``."""
        check_images(src, trg)
        size = src.shape[-1]
        multiple = size_multiple(self.config.backbone)
        if size % multiple:
            raise ValueError(f"vitsc needs input sides that are multiples of {multiple}, got {size}")
        images = torch.cat([src, trg])
        tokens = self.backbone(images)[-1]  # [2B, C, t, t]
        if self.cross is not None:
            batch2, _, height, width = tokens.shape
            x, y = self.proj(tokens.flatten(2).transpose(1, 2)).chunk(2)  # [B, t*t, d] each
            x, y = self.cross(x, y, height, width)
            tokens = torch.cat([x, y]).transpose(1, 2).reshape(batch2, -1, height, width)
        side = size // COARSE_STRIDE
        src_map, trg_map = F.interpolate(tokens, size=(side, side), mode="bilinear", align_corners=False).chunk(2)
        low = self.low_encoder(images) if self.low_encoder is not None else None
        options = self.config.options
        temperature = self.temperature
        with without_autocast(src.device.type):
            correlation = cosine_correlation(src_map.float(), trg_map.float())  # [B, h*h, h, h]
            coarse, matches = coarse_flow(
                correlation, temperature.float(), options.sigma if options.kernel else None, COARSE_STRIDE
            )
            local = None
            if options.upsampler == "guided_low":
                low_src, low_trg = low.float().chunk(2)
                guide = cosine_correlation(F.avg_pool2d(low_src, 2), low_trg)  # [B, h*h, S/4, S/4]
                positions = pixels_to_cells(matches.detach(), LOW_STRIDE)
                local = local_lookup(guide, positions, options.radius, (side, side))
            elif options.upsampler == "guided_high":
                positions = pixels_to_cells(matches.detach(), COARSE_STRIDE)
                local = local_lookup(correlation, positions, options.radius, (side, side))
        flow = self.upsampler(coarse, local, size)
        return VitscEncoded(flow.float(), src_map, trg_map, coarse, temperature, size)

    def match(self, encoded: VitscEncoded, src_kps: Tensor, valid: Tensor) -> list[Matches]:
        """``[coarse, fine]`` for ``src_kps`` ``[B, N, 2]`` input pixels, ``valid`` ``[B, N]`` bool
        (invalid keypoints are read at pixel ``(0, 0)``): ``coarse`` the kernel soft-argmax of each
        keypoint's cosine row on the stride-8 maps; ``fine`` a :class:`FlowMatches`, ``p + M'(p)``
        clipped to the image (``[-0.5, S - 0.5]``)."""
        src_kps = checked_keypoints(src_kps, valid, encoded.batch_size)
        options, config = self.config.options, self.config
        localization = Localization(
            "kernel" if options.kernel else "dense", beta=encoded.temperature.float(), sigma=options.sigma
        )
        coarse = match_keypoints(
            encoded.src, encoded.trg, src_kps, COARSE_STRIDE, localization, config.keypoint_sampling, config.pixel_convention
        )
        with without_autocast(src_kps.device.type):
            points = src_kps.float()
            fine = (points + read_flow(encoded.flow.float(), points)).clamp(-0.5, encoded.size - 0.5)
            src_features = sample_keypoint_features(
                encoded.src.float(), points, COARSE_STRIDE, config.keypoint_sampling, config.pixel_convention
            )
        return [coarse, FlowMatches(fine, coarse.scores, COARSE_STRIDE, encoded.flow, points, src_features, encoded.trg)]

    def loss(self, outputs: list[Matches], target: Tensor, valid: Tensor) -> Tensor:
        """``epe_weight`` x the EPE of the fine flow against the pseudo-dense flow of the keypoints
        (``target`` ``[B, N, 2]`` input pixels, ``valid`` ``[B, N]`` bool) + ``aux_weight`` x the
        keypoint triplet loss on the enhanced stride-8 features (:mod:`sm_model.vitsc.losses`)."""
        fine = outputs[-1]
        options, config = self.config.options, self.config
        size = fine.flow.shape[-1]
        with without_autocast(fine.flow.device.type):
            target = torch.where(valid[..., None], target.float(), fine.src_kps)
            flow, mask = pseudo_flow(fine.src_kps, target, valid, size, options.halfwidth(size))
            loss = options.epe_weight * epe_loss(fine.flow.float(), flow, mask)
            if options.aux_weight:
                trg_features = sample_keypoint_features(
                    fine.trg_map.float(), target, COARSE_STRIDE, config.keypoint_sampling, config.pixel_convention
                )
                loss = loss + options.aux_weight * triplet_loss(fine.src_features, trg_features, valid, options.margin)
        return loss
