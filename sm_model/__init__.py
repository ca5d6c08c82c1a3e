"""SimpleMatch in pure PyTorch, built from one typed :class:`~sm_model.config.ModelConfig`.

==========================  ===================================================================
:mod:`sm_model.config`      the model's typed config; typed dataclasses from plain mappings
:mod:`sm_model.pixels`      the pixel, resize and normalisation conventions
:mod:`sm_model.backbones`   timm encoders (DINOv2, iBOT, ResNet) and their weights; :mod:`.lora`
:mod:`sm_model.decoder`     the upsampling decoder to 1/4 resolution
:mod:`sm_model.matching`    sparse matching and window / dense soft-argmax (pure functions)
:mod:`sm_model.loss`        the multi-scale Euclidean loss
:mod:`sm_model.simplematch` the model: forward per scale, loss, predict in original pixels
:mod:`sm_model.checkpoint`  the checkpoint file format: save, read, load strictly
:mod:`sm_model.official`    the released ``best_model.pth`` layout
:mod:`sm_model.batches`     pairs prepared and batched for the network, the DataLoader
==========================  ===================================================================

This package imports nothing itself: ``sm_model.config`` loads without torch.
"""
