"""HU conversion, windowing, neighbour rule and 3-slice loading, with known pixel values."""
import cv2
import numpy as np
import pytest

from fsd_d2.data.ct import load_three_slice, neighbour_slice_indices, png_to_hu, window_to_uint8


def test_png_to_hu_subtracts_32768():
    hu = png_to_hu(np.array([0, 32768, 32768 + 60, 65535], dtype=np.uint16))
    assert hu.dtype == np.float32
    assert hu.tolist() == [-32768.0, 0.0, 60.0, 32767.0]
    with pytest.raises(ValueError, match="uint16"):
        png_to_hu(np.zeros(3, dtype=np.uint8))


def test_window_maps_linearly_and_clips():
    hu = np.array([-200, -100, 0, 155, 1000], dtype=np.float32)
    assert window_to_uint8(hu, -100, 155).tolist() == [0, 0, 100, 255, 255]
    # reference window [-1024, 3071]: 0 HU -> 1024 * 255 / 4095 = 63.8 -> 64
    assert window_to_uint8(np.array([-3000, -1024, 0, 3071, 5000]), -1024, 3071).tolist() == [0, 0, 64, 255, 255]
    with pytest.raises(ValueError, match="lo < hi"):
        window_to_uint8(hu, 100, 100)


@pytest.mark.parametrize("key,first,last,expected", [
    (5, 1, 9, (4, 5, 6)), (1, 1, 9, (1, 1, 2)), (9, 1, 9, (8, 9, 9)), (3, 3, 3, (3, 3, 3))])
def test_neighbours_clamp_at_volume_ends(key, first, last, expected):
    assert neighbour_slice_indices(key, first, last) == expected


def test_neighbours_reject_key_outside_range():
    with pytest.raises(ValueError, match="outside the slice range 1-9"):
        neighbour_slice_indices(10, 1, 9)


def _write_hu(path, hu, shape=(4, 6)):
    cv2.imwrite(str(path), np.full(shape, hu + 32768, dtype=np.uint16))
    return str(path)


def test_load_three_slice_stacks_prev_key_next(tmp_path):
    prev, key, nxt = (_write_hu(tmp_path / f"{i}.png", hu) for i, hu in ((1, -1024), (2, 0), (3, 3071)))
    image = load_three_slice([prev, key, nxt], (-1024, 3071))
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [0, 64, 255]
    edge = load_three_slice([key, key, nxt], (-1024, 3071))  # first slice of a volume: key repeats
    assert edge[0, 0].tolist() == [64, 64, 255]


def test_load_three_slice_errors_name_the_file(tmp_path):
    key = _write_hu(tmp_path / "2.png", 0)
    missing = str(tmp_path / "1.png")
    with pytest.raises(FileNotFoundError, match=missing):
        load_three_slice([missing, key, key], (-1024, 3071))
    eight_bit = str(tmp_path / "8bit.png")
    cv2.imwrite(eight_bit, np.zeros((4, 6), dtype=np.uint8))
    with pytest.raises(ValueError, match=f"{eight_bit}: expected a single-channel 16-bit PNG"):
        load_three_slice([eight_bit, key, key], (-1024, 3071))
    other_size = _write_hu(tmp_path / "3.png", 0, shape=(5, 6))
    with pytest.raises(ValueError, match="differ in size"):
        load_three_slice([key, key, other_size], (-1024, 3071))
