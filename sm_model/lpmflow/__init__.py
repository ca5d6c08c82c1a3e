"""LPMFlow (kind ``lpmflow``), "Pixel-level Semantic Correspondence through Layout-aware
Representation Learning and Multi-scale Matching Integration" (CVPR 2024), as its released code
(github YXSUNMADMAX/LPMFlow, commit 8ac9737) computes it: an iBOT ViT-B/16 with the CLS token,
token replacement in training, a layout-aware joint encoder of both images' tokens, a progressive
decoder (16<->16, feature super-resolution, 16<->32 and 32<->16, 32<->32) whose four
cross-attention maps become four soft-argmax flows, and a Swin refinement to a 128 x 128 flow.

==============================================  =====================================================
:mod:`sm_model.lpmflow.config`                  its options (``model.lpmflow:``), registered here
:mod:`sm_model.lpmflow.layers`                  the attention and MLP the encoder, decoder and Swin share
:mod:`sm_model.lpmflow.encoder`                 the joint encoder with the relative-position bias
:mod:`sm_model.lpmflow.decoder`                 the decoder block and its bounded activation
:mod:`sm_model.lpmflow.swin`                    window attention, channel attention, FSR, refinement
:mod:`sm_model.lpmflow.flow`                    attention maps to flows, the released keypoint transfer
:mod:`sm_model.lpmflow.losses`                  token replacement, ground-truth flow, EPE, InfoNCE
:mod:`sm_model.lpmflow.model`                   :class:`~sm_model.lpmflow.model.LPMFlow`
:mod:`sm_model.lpmflow.released`                the released ``--pretrained`` folder
==============================================  =====================================================

Importing the package registers the kind and needs no torch; the model is in ``.model``.
"""

from sm_model.lpmflow.config import LpmflowOptions

__all__ = ["LpmflowOptions"]
