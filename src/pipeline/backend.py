"""The array backend: picks the array namespace `xp` once, from config.

The numerical core (pipeline.softmax) only calls functions of the Python array
API standard on `xp`, so NumPy, CuPy or array-api-strict can run it unchanged.
Randomness and file I/O stay on the host, in NumPy.
"""

import numpy as np

from pipeline.errors import PipelineError


def get_namespace(name):
    if name == "numpy":
        return np
    if name == "array_api_strict":  # a stand-in accelerator for tests
        import array_api_strict

        return array_api_strict
    raise PipelineError(f"config backend.name={name!r}: expected 'numpy'")


def to_device(xp, host_array):
    """Copy a NumPy array into the backend's memory (no copy for NumPy)."""
    return xp.asarray(host_array)


def to_host(xp, array):
    """The array as NumPy, for saving, plotting and logging."""
    if xp is np:
        return array
    return np.from_dlpack(array) if hasattr(array, "__dlpack__") else np.asarray(array)
