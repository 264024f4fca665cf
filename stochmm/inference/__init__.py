"""Inference on fitted models: model comparison (:mod:`~stochmm.inference.comparison`)."""
