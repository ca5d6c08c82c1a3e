"""Distributed PCK evaluation and reports; consumes ``pipelines.reader`` and ``sm_train``'s model."""
