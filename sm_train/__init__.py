"""Distributed training of :mod:`sm_model` models on Ray Train, and Ray Tune sweeps.

=================  ====================================================================
``config``         typed YAML configs with overrides; the selection metric; no torch imported
``data``           exact per-rank epoch plans and training batches from ``pipelines.reader``
``augment``        the official augmentation recipe on the device (kornia)
``loop``           ``train_loop_per_worker``: steps, validation (:mod:`sm_eval`), checkpoints
``trainer``        the Ray Train ``TorchTrainer`` for a config
``tune``           the ``python -m sm_train.tune`` sweeps
``__main__``       the ``python -m sm_train`` command line
=================  ====================================================================
"""
