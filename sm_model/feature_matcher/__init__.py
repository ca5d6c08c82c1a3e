"""Matching on a backbone's own features: kinds ``zero-shot`` and ``baseline``.

=================================================  ==================================================
:mod:`sm_model.feature_matcher.config`             their options, registered here
:mod:`sm_model.feature_matcher.model`              :class:`~sm_model.feature_matcher.model.FeatureMatcher`
=================================================  ==================================================

Importing the package registers the kinds and needs no torch; the model is in ``.model``.
"""

from sm_model.feature_matcher.config import BaselineOptions, ZeroShotOptions

__all__ = ["BaselineOptions", "ZeroShotOptions"]
