"""MNIST softmax regression as a reproducible DVC + Hydra + MLflow workflow.

Stages, in data-flow order (each is `python -m pipeline.<stage>`):
fetch -> normalise -> train -> evaluate -> export_filters.
"""
