"""SimpleMatch (kind ``simplematch``): a pretrained backbone, an upsampling decoder to 1/4
resolution, sparse matching of source keypoints against the whole target map, window soft-argmax.

==============================================  =====================================================
:mod:`sm_model.simplematch.config`              its options (``model.simplematch:``), registered here
:mod:`sm_model.simplematch.decoder`             the upsampling decoders (ViT, ResNet)
:mod:`sm_model.simplematch.model`               :class:`~sm_model.simplematch.model.SimpleMatch`
==============================================  =====================================================

Importing the package registers the kind and needs no torch; the model is in ``.model``.
"""

from sm_model.simplematch.config import SimpleMatchOptions

__all__ = ["SimpleMatchOptions"]
