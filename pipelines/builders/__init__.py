"""Builders: the only code in ``pipelines`` that writes a dataset layout for a reader to read.

A reader under :mod:`pipelines.sources` only reads; where a benchmark's layout has to be made
first, its builder here makes it, each with a CLI (``python -m pipelines.builders.<name>``):

- :mod:`pipelines.builders.demo` generates the demo dataset (SPair-71k layout) from the photos
  bundled with scikit-image;
- :mod:`pipelines.builders.ap10k` writes GeoAware-SC's AP-10K pair layout from the raw release,
  with GeoAware's pairing recipe, which the AP-10K reader also applies in memory to a raw root.
"""
