"""Distributed PCK evaluation and reports; consumes ``pipelines.reader`` and :mod:`sm_model`
(it never imports ``sm_train``; training validation imports :mod:`sm_eval.pck` and :mod:`sm_eval.predict`).

=================  ====================================================================
``pck``            the PCK protocol, the only place it lives (training validation uses it)
``predict``        model predictions as per-keypoint records; per-shard evaluation batches
``plan``           a split's pairs in index order, whole shards per worker, canonical order
``checkpoints``    checkpoint files or ``model.pt`` directories, local or S3, released files and
                   zero-shot specs as checkpoints; model names
``runner``         prediction in this process or on Ray workers, identical to the last bit
``report``         ``report.json`` / ``report.md`` content and the predictions table
``figures``        the PCK curve and match pictures (PIL)
``match``          ``python -m sm_eval.match``: any model on your own two images
``evaluate``       one evaluation end to end: plan, predict, aggregate, write ``--out``
``__main__``       the ``python -m sm_eval`` command line
=================  ====================================================================

Submodules are imported where used (this package imports nothing), so DataLoader processes that
unpickle :mod:`sm_eval.predict` stages do not pay for Ray or the report code.
"""
