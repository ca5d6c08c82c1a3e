"""ViTSC (kind ``vitsc``), from "Bridging the gap between semantic correspondence and robust visual
representation": a DINOv2 H-Encoder, a cross-perception module, a coarse flow from the stride-8
correlation (Gaussian kernel, learned temperature), a correlation-guided upsampler to the full
input resolution fed by a ResNet-18 L-Encoder, and the EPE + keypoint triplet loss.

==============================================  =====================================================
:mod:`sm_model.vitsc.config`                    its options (``model.vitsc:``), registered here
:mod:`sm_model.vitsc.cross_perception`          the interleaved cross-perception layers
:mod:`sm_model.vitsc.low_encoder`               the L-Encoder: ResNet-18 to layer3 at stride 4
:mod:`sm_model.vitsc.correlation`               cosine correlation, coarse flow, RAFT-style lookup
:mod:`sm_model.vitsc.upsampler`                 the flow head to full resolution
:mod:`sm_model.vitsc.losses`                    pseudo-dense flow, EPE, keypoint triplet loss
:mod:`sm_model.vitsc.model`                     :class:`~sm_model.vitsc.model.ViTSC`
==============================================  =====================================================

Importing the package registers the kind and needs no torch; the model is in ``.model``.
"""

from sm_model.vitsc.config import VitscOptions

__all__ = ["VitscOptions"]
