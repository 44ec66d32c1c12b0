"""Read and write IDX files, the format MNIST ships in.

Layout: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions,
then one big-endian uint32 per dimension, then the data. MNIST images have
magic 2051 (3 dims: count, rows, cols), labels magic 2049 (1 dim: count).
"""

import struct
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_UINT8 = 0x08


class IdxError(PipelineError):
    def __init__(self, path, field, expected, found):
        super().__init__(
            f"{path}: IDX field '{field}' is {found}, expected {expected}. "
            "The file is corrupt or not MNIST; delete it and run the fetch stage again."
        )
        self.path, self.field = Path(path), field


def read_idx(path, magic):
    """Parse one IDX file with the given magic number into a uint8 array."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 4:
        raise IdxError(path, "header", "at least 4 bytes", f"{len(data)} bytes")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise IdxError(path, "magic", magic, found_magic)
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IdxError(path, "dimensions", f"{ndim} dimension sizes", "a truncated header")
    dims = struct.unpack(f">{ndim}I", data[4:header_size])
    expected_size = header_size + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected_size:
        raise IdxError(path, "file size", f"{expected_size} bytes for dims {dims}", f"{len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def read_images(path):
    return read_idx(path, IMAGES_MAGIC)  # the magic fixes ndim = 3


def read_labels(path, num_classes):
    labels = read_idx(path, LABELS_MAGIC)  # the magic fixes ndim = 1
    if labels.size and labels.max() >= num_classes:
        raise IdxError(path, "label", f"values 0..{num_classes - 1}", int(labels.max()))
    return labels


def encode_idx(array):
    """The IDX bytes of a uint8 array (1-D: labels, 3-D: images)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX encoding supports uint8 only, got {array.dtype}")
    header = bytes([0, 0, _UINT8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()
