"""The array backend: picks the array namespace `xp` and its device once, from config.

The numerical core (pipeline.core.model, pipeline.core.optim) only calls array-API
functions on `xp`, so NumPy, CuPy and array-api-strict (the tests' stand-in
accelerator) run it unchanged. Randomness and file I/O stay on the host in
NumPy; data is copied to the device once, before training.

Backend numba is NumPy whose trainer runs softmax regression in compiled loops
(pipeline.core.compiled); everything else on it is the NumPy code. `auto` takes
numba, else NumPy; CuPy only when asked for (see select).
"""

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: str  # what actually runs: numpy, numba, cupy or array_api_strict
    xp: Any
    device: Any = None  # None: the namespace's default device

    def to_device(self, host_array):
        """Copy a NumPy array to the device (no copy for NumPy)."""
        if self.device is None:
            return self.xp.asarray(host_array)
        return self.xp.asarray(host_array, device=self.device)

    def to_host(self, array):
        """The array as NumPy, for saving, plotting and logging."""
        if self.name in ("numpy", "numba"):
            return array
        if self.name == "cupy":
            return array.get()
        return np.asarray(array.to_device(self.xp.Device("CPU_DEVICE")))


def select(name):
    """The Backend for config backend.name (numpy | numba | cupy | auto)."""
    if name == "numpy":
        return Backend("numpy", np)
    if name == "numba":
        return _numba(required=True)
    if name == "cupy":
        return _cupy(required=True)
    if name == "auto":
        # Not CuPy: at the lecture's batch sizes its many small kernels lost to the CPU (DESIGN.md §6,
        # an H200 slower than NumPy at batch 128); choose backend=cupy for a GPU explicitly.
        chosen = _numba(required=False) or Backend("numpy", np)
        log.info("backend auto -> %s", chosen.name)
        return chosen
    raise PipelineError(f"config backend.name={name!r}: expected numpy, numba, cupy or auto")


def _numba(required):
    """NumPy with the compiled trainer; if Numba does not import: an error when required, else None."""
    try:
        import numba  # noqa: F401  (a dependency; absent or broken only in an odd environment)

        from pipeline.core import compiled  # noqa: F401
    except ImportError as err:
        if not required:
            return None
        raise PipelineError(
            f"backend=numba: Numba does not import ({err}). It is a dependency of this project: "
            "run `pip install -e .` again, or use backend=numpy or backend=auto."
        ) from err
    return Backend("numba", np)


def _cupy(required):
    """CuPy on the current GPU; if there is none: an error when required, else None."""
    try:
        import cupy  # here and in core/fused_gpu.py, which only backend cupy reaches
    except ImportError as err:
        if not required:
            return None
        raise PipelineError(
            f"backend=cupy: CuPy is not installed ({err}). On a machine with an NVIDIA GPU "
            "run `pip install -e '.[gpu]'`, or use backend=numpy or backend=auto."
        ) from err
    # `import cupy` succeeds without a GPU; is_available() says whether CUDA sees one.
    if not cupy.cuda.is_available():
        if not required:
            return None
        raise PipelineError(
            "backend=cupy: CuPy is installed but no CUDA GPU is visible (cupy.cuda.is_available() "
            "is False). Check the NVIDIA driver and CUDA_VISIBLE_DEVICES, or use backend=numpy "
            "or backend=auto."
        )
    return Backend("cupy", cupy)
