"""MNIST softmax regression as a reproducible DVC + Hydra + MLflow workflow.

Stages, in data-flow order (each is `python -m pipeline.<stage>`):
resolve -> fetch -> normalise -> train -> evaluate -> export_filters.
Layout and import rules: README.md, "Layout" (tests/test_layout.py enforces them).
"""
