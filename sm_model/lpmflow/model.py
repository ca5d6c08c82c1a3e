"""LPMFlow (kind ``lpmflow``) as its released code computes it (``sm_model/README.md``, section
LPMFlow, lists every difference from that code and why).

encode (a pair-level encoding, :class:`LpmflowEncoded`), ``g = image_size / patch`` (16)::

    resize     the input frame S_in (512) -> image_size S (256), bilinear       [2B, 3, S, S]
    backbone   ViT tokens after the final LayerNorm, CLS first                  T^s, T^t [B, 1+g^2, C]
    replace    training only: source tokens most like both CLS -> CLS sum, + a training position
    encoder    the layout-aware joint encoder                                   Z^s, Z^t
    D1         g <-> g                                                          A11 [B, g^2, g^2]
    FSR        feature super-resolution x2                                      [B, 1+4g^2, C]
    D2         g -> 2g and 2g -> g, one block twice                             A12, A21
    D3         2g <-> 2g on FSR(S12) + S21 and U12 + FSR(U21)                   A22 [B, 4g^2, 4g^2]
    flows      soft-argmax of each map at 2g, repeated onto 8g                  F11, F12, F21, F22 [B, 2, 8g, 8g]
    context    ReLU(conv1x1(D3's source map)) bilinear to 8g                    [B, ctx, 8g, 8g]
    refine     Swin stages (windows 16, 8, 4) + channel attention -> residual   flow = F22 + delta

match: each keypoint of the input frame truncated to its pixel and moved by the flow upsampled to
that frame (:func:`sm_model.lpmflow.flow.transfer_keypoints`), as the released evaluation does;
scores are the cosine rows of D3's maps. loss: EPE on the released pseudo-dense flow plus the
epoch-weighted InfoNCE of the replaced tokens (:mod:`sm_model.lpmflow.losses`). The attention
probabilities, soft-argmax, flows, keypoint reads and losses run in float32 with autocast off.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sm_model.backbones import build_backbone
from sm_model.config import ModelConfig
from sm_model.lpmflow.decoder import DecoderBlock
from sm_model.lpmflow.encoder import JointEncoder
from sm_model.lpmflow.flow import attention_flow, to_flow_grid, transfer_keypoints
from sm_model.lpmflow.losses import contrastive_loss, epe_loss, released_flow_target, replace_tokens
from sm_model.lpmflow.swin import FeatureSuperResolution, FlowRefinement, effective_window
from sm_model.matcher import MatchModel, check_images, checked_keypoints
from sm_model.matching import Matches, cosine_similarity, sample_keypoint_features, without_autocast

FLOW_COUNT = 4
"""The flows that enter the refinement beside the context feature: F11, F12, F21, F22."""


class LpmflowEncoded(NamedTuple):
    """A batch of pairs encoded by LPMFlow: the final ``flow`` ``[B, 2, 8g, 8g]`` (flow cells,
    float32), D3's source and target maps ``src``, ``trg`` ``[B, C, 2g, 2g]``, the training-mode
    ``contrastive`` loss of the replaced tokens (0-dim; ``None`` in eval mode) and the input
    frame's side ``size``."""

    flow: Tensor
    src: Tensor
    trg: Tensor
    contrastive: Tensor | None
    size: int

    @property
    def batch_size(self) -> int:
        return self.flow.shape[0]


class LpmflowMatches(NamedTuple):
    """The prediction: ``points``, ``scores``, ``stride`` as :class:`~sm_model.matching.Matches`
    (transferred points ``[B, N, 2]`` in input pixels; the cosine rows ``[B, N, 2g, 2g]`` of D3's
    maps at stride ``S_in / 2g``), and what the loss needs: the ``flow``, the ``src_kps`` read
    (invalid ones at ``(0, 0)``), the ``contrastive`` loss of :class:`LpmflowEncoded` and the
    input side ``size`` the points are in."""

    points: Tensor
    scores: Tensor
    stride: float
    flow: Tensor
    src_kps: Tensor
    contrastive: Tensor | None
    size: int


class LPMFlow(MatchModel):
    """The LPMFlow model (kind ``lpmflow``), built from a :class:`ModelConfig` with
    :class:`~sm_model.lpmflow.config.LpmflowOptions` (see the module). Its ``input_spec`` takes
    images at ``lpmflow.input_size`` (512: ``LpmflowOptions.input_side``), resized as the released
    loader does; the network brings them to ``image_size`` itself. ``backbone``: the ViT
    (``sm_train`` gives it ``backbone_lr``); everything else is the head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        options = config.options
        self.backbone = build_backbone(config)
        dim, patch = self.backbone.channels[-1], self.backbone.strides[-1]
        self.grid = config.image_size // patch
        up, flow_side = 2 * self.grid, 8 * self.grid
        self.epoch: int | None = None
        if options.train_pe:
            self.train_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        for name in ("grid_x", "grid_y"):  # the soft-argmax coordinates, in [-1, 1]
            coordinates = torch.linspace(-1, 1, up)
            if options.learn_grid:
                self.register_parameter(name, nn.Parameter(coordinates))
            else:
                self.register_buffer(name, coordinates)
        self.encoder = JointEncoder(
            dim, self.grid, options.encoder_depth, options.heads, options.mlp_ratio, options.dropout
        )
        block = dict(
            dim=dim,
            heads=options.heads,
            mlp_ratio=options.mlp_ratio,
            dropout=options.dropout,
            grid=self.grid,
            src_mlp=options.src_mlp,
        )
        self.decoder_coarse = DecoderBlock(grids=(self.grid,), **block)
        self.decoder_cross = DecoderBlock(grids=(self.grid, up), **block)
        self.decoder_fine = DecoderBlock(grids=(up,), **block)
        self.fsr = FeatureSuperResolution(dim, options.heads, effective_window(options.fsr_window, up))
        self.context = nn.Sequential(nn.Conv2d(dim, options.context_channels, 1), nn.ReLU())
        self.context_dropout = nn.Dropout2d(options.context_dropout)
        windows = tuple(effective_window(window, flow_side) for window in options.refine_windows)
        self.refinement = FlowRefinement(FLOW_COUNT * 2 + options.context_channels, options.heads, windows)

    def set_epoch(self, epoch: int) -> None:
        """The (0-based) training epoch, which weighs the contrastive loss."""
        self.epoch = epoch

    def encode(self, src: Tensor, trg: Tensor) -> LpmflowEncoded:
        """The pair-level encoding of ``src``, ``trg`` ``[B, 3, S_in, S_in]`` ImageNet-normalised
        (any side: the network resizes them to ``image_size``, and the points of :meth:`match` are
        in that frame); both images go through the backbone as one batch of ``2B``. In training
        mode the source tokens are replaced (torch's global generator draws which) and the
        contrastive loss is computed."""
        check_images(src, trg)
        size, options = src.shape[-1], self.config.options
        images = F.interpolate(torch.cat([src, trg]), size=self.config.image_size, mode="bilinear", align_corners=False)
        src_tokens, trg_tokens = self.backbone.tokens(images).chunk(2)
        replaced = None
        if self.training:
            patches = self.grid**2
            topk = int(patches * options.topk_fraction)
            src_tokens, replaced = replace_tokens(src_tokens, trg_tokens, topk, int(topk * options.replace_fraction))
            if options.train_pe:
                src_tokens = src_tokens + self.train_pos_embed
        src_encoded, trg_encoded = self.encoder(src_tokens, trg_tokens)
        s1, t1, a11 = self.decoder_coarse(src_encoded, trg_encoded)
        s_up, t_up = self.fsr(s1), self.fsr(t1)
        s12, t12, a12 = self.decoder_cross(s1, t_up)
        s21, t21, a21 = self.decoder_cross(s_up, t1)
        s3, t3, a22 = self.decoder_fine(self.fsr(s12) + s21, t12 + self.fsr(t21))
        up, flow_side = 2 * self.grid, 8 * self.grid
        src_map, trg_map = (tokens[:, 1:].transpose(1, 2).unflatten(2, (up, up)) for tokens in (s3, t3))
        context = F.interpolate(self.context(src_map), size=flow_side, mode="bilinear", align_corners=True)
        flows = [
            to_flow_grid(attention_flow(attention, up, self.grid_x, self.grid_y, options.flow_beta), flow_side)
            for attention in (a11, a12, a21, a22)
        ]
        features = torch.cat([flows[0], self.context_dropout(context).float(), *flows[1:]], dim=1)
        flow = flows[-1] + self.refinement(features).float()
        contrastive = None
        if replaced is not None:
            contrastive = contrastive_loss(src_encoded, replaced, self.grid, options.contrastive_temperature)
        return LpmflowEncoded(flow, src_map, trg_map, contrastive, size)

    def match(self, encoded: LpmflowEncoded, src_kps: Tensor, valid: Tensor) -> list[Matches]:
        """``[LpmflowMatches]`` for ``src_kps`` ``[B, N, 2]`` input pixels, ``valid`` ``[B, N]``
        bool (invalid keypoints are read at pixel ``(0, 0)``): each point moved by the flow as the
        released evaluation moves it."""
        src_kps = checked_keypoints(src_kps, valid, encoded.batch_size)
        config = self.config
        stride = encoded.size / encoded.src.shape[-1]
        with without_autocast(src_kps.device.type):
            points = transfer_keypoints(encoded.flow, src_kps, encoded.size)
            features = sample_keypoint_features(
                encoded.src.float(), src_kps.float(), stride, config.keypoint_sampling, config.pixel_convention
            )
            scores = cosine_similarity(features, encoded.trg.float())
        return [LpmflowMatches(points, scores, stride, encoded.flow, src_kps.float(), encoded.contrastive, encoded.size)]

    def loss(self, outputs: list[Matches], target: Tensor, valid: Tensor) -> Tensor:
        """The EPE of the flow against the released pseudo-dense flow of the keypoints (``target``
        ``[B, N, 2]`` input pixels, ``valid`` ``[B, N]`` bool), in flow cells, plus the InfoNCE of
        the replaced tokens weighted for the epoch set by :meth:`set_epoch`."""
        prediction = outputs[-1]
        options = self.config.options
        flow = prediction.flow
        side = flow.shape[-1]
        stride = prediction.size / side  # input pixels per flow cell
        with without_autocast(flow.device.type):
            gt, mask = released_flow_target(prediction.src_kps, target.float(), valid, side, stride, options.halfwidth(stride))
            loss = epe_loss(flow.float(), gt, mask)
        if prediction.contrastive is not None:
            loss = loss + options.contrastive_weight_at(self.epoch) * prediction.contrastive
        return loss
