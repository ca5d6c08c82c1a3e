"""SimpleMatch and the other models of the field in pure PyTorch, each built from one typed
:class:`~sm_model.config.ModelConfig` whose ``kind`` picks it; :func:`sm_model.factory.create_model`
is the front door. The package imports no data pipeline.

====================================  ===========================================================
:mod:`sm_model.config`                the typed config, shared fields and a section per kind; the kind registry
:mod:`sm_model.inputs`                a model's input (:class:`~sm_model.inputs.InputSpec`)
:mod:`sm_model.pixels`                the pixel and resize conventions
:mod:`sm_model.backbones`             timm encoders (DINOv2, iBOT, ResNet) and their weights; :mod:`.lora`
:mod:`sm_model.matching`              sparse matching: keypoint features, cosine scores (pure functions)
:mod:`sm_model.localizers`            argmax, dense, window and kernel soft-argmax (pure functions)
:mod:`sm_model.loss`                  the multi-scale Euclidean loss; the Gaussian cross-entropy
:mod:`sm_model.matcher`               the contract of every kind: encode once, match any points
:mod:`sm_model.simplematch`           SimpleMatch (kind ``simplematch``): options, decoder, model
:mod:`sm_model.feature_matcher`       matching on backbone features (kinds ``zero-shot``, ``baseline``)
:mod:`sm_model.vitsc`                 ViTSC (kind ``vitsc``): options, cross-perception, L-Encoder, upsampler, losses, model
:mod:`sm_model.registry`              ``build_model``, zero-shot specs
:mod:`sm_model.factory`               ``create_model``: any model from a config, a file or a name
:mod:`sm_model.checkpoint`            the checkpoint file format: save, read, load strictly
:mod:`sm_model.released`              released files of any kind; :mod:`.official`: SimpleMatch's layout
====================================  ===========================================================

This package imports nothing itself: ``sm_model.config`` loads without torch.
"""
