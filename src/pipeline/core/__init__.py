"""The numerical core: the lecture's softmax regression, the MLP, SGD and its
schedules, the training loop and the array backend.

Array API and NumPy only: nothing here imports Hydra, OmegaConf or MLflow, so
the benchmarks and the GPU check run this very code without the workflow's stack.
"""
