"""A browser viewer of matches and evaluations: ``python -m sm_eval.viewer`` (Gradio).

- **Match tab**: any model ``sm_eval`` takes (``--model`` a checkpoint of any kind, a released
  ``best_model.pth`` with ``--official-config``, or ``zero-shot:BACKBONE`` with
  ``--backbone-weights``; ``--image-size``), two images by upload, local path or ``s3://``. The pair
  is encoded once when it is loaded; a click on the source runs one ``match`` against that encoding
  and shows the point's match on the target, its score and the heat map of its similarity over the
  target. Points stay on screen, each in its colour, until cleared.
- **Evaluation tab**: an ``sm_eval`` output folder (local or ``s3://``): the per-category figures
  (equal to ``report.json``'s), the pairs with category, difficulty flags and per-pair PCK (filter,
  sort), and each pair drawn at the chosen alpha and frame.

The logic lives apart from the browser: :mod:`~sm_eval.viewer.match_view`,
:mod:`~sm_eval.viewer.eval_view` and the security rules in :mod:`~sm_eval.viewer.access`;
:mod:`~sm_eval.viewer.app` is the Gradio layer, :mod:`~sm_eval.viewer.__main__` the command line.
Documented in ``sm_eval/README.md`` ("Looking at matches: the viewer").
"""
