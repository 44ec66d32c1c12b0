"""What users look at: the evaluation's DVC metrics and plots, the confusion
matrix and the filter images (matplotlib, NumPy only)."""
