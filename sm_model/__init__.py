"""SimpleMatch and the other models of the field in pure PyTorch, each built from one typed
:class:`~sm_model.config.ModelConfig` whose ``kind`` picks it from :mod:`sm_model.registry`.

==============================  ===============================================================
:mod:`sm_model.config`          the model's typed config; typed dataclasses from plain mappings
:mod:`sm_model.pixels`          the pixel, resize and normalisation conventions
:mod:`sm_model.backbones`       timm encoders (DINOv2, iBOT, ResNet) and their weights; :mod:`.lora`
:mod:`sm_model.simplematch.decoder`         the upsampling decoder to 1/4 resolution
:mod:`sm_model.matching`        sparse matching: keypoint features, cosine scores (pure functions)
:mod:`sm_model.localizers`      argmax, dense, window and kernel soft-argmax (pure functions)
:mod:`sm_model.loss`            the multi-scale Euclidean loss; the Gaussian cross-entropy
:mod:`sm_model.matcher`         the contract of every kind: forward per scale, loss, predict
:mod:`sm_model.simplematch`     SimpleMatch (kind ``simplematch``)
:mod:`sm_model.feature_matcher` matching on backbone features (kinds ``zero-shot``, ``baseline``)
:mod:`sm_model.registry`        the model kinds, ``build_model``, zero-shot specs
:mod:`sm_model.checkpoint`      the checkpoint file format: save, read, load strictly
:mod:`sm_model.official`        the released ``best_model.pth`` layout
:mod:`sm_feed.batches`         pairs prepared and batched for the network, the DataLoader
==============================  ===============================================================

This package imports nothing itself: ``sm_model.config`` loads without torch.
"""
