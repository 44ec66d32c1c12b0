import numpy as np
import pytest

from pipeline.data.idx import IdxError, encode_idx, read_images, read_labels


def test_images_and_labels_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    (tmp_path / "x").write_bytes(encode_idx(images))
    (tmp_path / "y").write_bytes(encode_idx(labels))
    assert np.array_equal(read_images(tmp_path / "x"), images)
    assert np.array_equal(read_labels(tmp_path / "y", 10), labels)


def test_header_is_the_mnist_layout():
    blob = encode_idx(np.zeros((2, 28, 28), dtype=np.uint8))
    assert blob[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28])
    assert len(blob) == 16 + 2 * 784


def _write(tmp_path, blob):
    path = tmp_path / "file-ubyte"
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("mangle, field", [
    (lambda b: b[:2], "header"),                                # shorter than the magic
    (lambda b: bytes([0, 0, 8, 1]) + b[4:], "magic"),           # labels magic in an images file
    (lambda b: b[:10], "dimensions"),                           # header cut inside the dims
    (lambda b: b[:-1], "file size"),                            # one pixel missing
    (lambda b: b + b"\x00", "file size"),                       # trailing garbage
    (lambda b: b[:4] + (3).to_bytes(4, "big") + b[8:], "file size"),  # count says 3, data holds 2
])
def test_malformed_images_name_the_file_and_field(tmp_path, mangle, field):
    path = _write(tmp_path, mangle(encode_idx(np.zeros((2, 28, 28), dtype=np.uint8))))
    with pytest.raises(IdxError) as info:
        read_images(path)
    assert info.value.field == field
    assert str(path) in str(info.value) and field in str(info.value)


def test_label_above_the_classes_is_refused(tmp_path):
    path = _write(tmp_path, encode_idx(np.array([1, 10, 3], dtype=np.uint8)))
    with pytest.raises(IdxError, match="label.*10.*expected values 0..9"):
        read_labels(path, 10)
