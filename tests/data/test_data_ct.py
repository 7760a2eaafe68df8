"""HU conversion, windowing, which slices make each channel (adjacent or at a fixed mm interval) and 3-slice
loading, with known pixel values."""
import cv2
import numpy as np
import pytest

from fsd_d2.data.ct import channel_slices, load_slice_mix, png_to_hu, window_to_uint8


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
def test_interval_0_takes_adjacent_slices_clamped_at_volume_ends(key, first, last, expected):
    expected_mix = tuple(((i, 1.0),) for i in expected)
    assert channel_slices(key, first, last, 5.0, 0.0) == expected_mix
    assert channel_slices(key, first, last, 0.0, 0.0) == expected_mix  # z spacing is not needed


def _approx(channels):
    return [[(i, pytest.approx(w)) for i, w in channel] for channel in channels]


@pytest.mark.parametrize("key,first,last,z,interval,expected", [
    # z = 5 mm, 2 mm: 0.4 slices away, between the key and its neighbour
    (5, 1, 9, 5.0, 2.0, [[(4, 0.4), (5, 0.6)], [(5, 1.0)], [(5, 0.6), (6, 0.4)]]),
    # z = 1 mm, 2 mm: exactly key +- 2, one slice each
    (5, 1, 9, 1.0, 2.0, [[(3, 1.0)], [(5, 1.0)], [(7, 1.0)]]),
    # z = 1.25 mm: 1.6 slices away, mixing the two slices around the position
    (5, 1, 9, 1.25, 2.0, [[(3, 0.6), (4, 0.4)], [(5, 1.0)], [(6, 0.4), (7, 0.6)]]),
    # volume ends: the position is clamped to the slice range before interpolating
    (1, 1, 9, 1.25, 2.0, [[(1, 1.0)], [(1, 1.0)], [(2, 0.4), (3, 0.6)]]),
    (2, 1, 9, 1.25, 2.0, [[(1, 1.0)], [(2, 1.0)], [(3, 0.4), (4, 0.6)]]),
    (9, 1, 9, 5.0, 2.0, [[(8, 0.4), (9, 0.6)], [(9, 1.0)], [(9, 1.0)]]),
    (3, 3, 3, 1.0, 2.0, [[(3, 1.0)], [(3, 1.0)], [(3, 1.0)]]),
    # 2.4 mm / 0.8 mm is 2.9999999999999996 in floats: still slice key +- 3 alone
    (5, 1, 9, 0.8, 2.4, [[(2, 1.0)], [(5, 1.0)], [(8, 1.0)]]),
])
def test_fixed_interval_interpolates_neighbours(key, first, last, z, interval, expected):
    channels = channel_slices(key, first, last, z, interval)
    assert _approx(channels) == expected
    assert all(sum(w for _, w in channel) == pytest.approx(1.0) for channel in channels)


def test_channel_slices_reject_bad_input():
    with pytest.raises(ValueError, match="outside the slice range 1-9"):
        channel_slices(10, 1, 9, 1.0, 0.0)
    with pytest.raises(ValueError, match="z spacing 0.0 mm cannot place neighbours 2 mm"):
        channel_slices(5, 1, 9, 0.0, 2.0)
    with pytest.raises(ValueError, match="slice interval must be >= 0 mm"):
        channel_slices(5, 1, 9, 1.0, -2.0)


def _write_hu(path, hu, shape=(4, 6)):
    cv2.imwrite(str(path), np.full(shape, hu + 32768, dtype=np.uint16))
    return str(path)


def _single(*paths):
    """Channels of one slice each, weight 1 (what interval 0 gives)."""
    return [[(p, 1.0)] for p in paths]


def test_load_slice_mix_stacks_prev_key_next(tmp_path):
    prev, key, nxt = (_write_hu(tmp_path / f"{i}.png", hu) for i, hu in ((1, -1024), (2, 0), (3, 3071)))
    image = load_slice_mix(_single(prev, key, nxt), (-1024, 3071))
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [0, 64, 255]
    edge = load_slice_mix(_single(key, key, nxt), (-1024, 3071))  # first slice of a volume: key repeats
    assert edge[0, 0].tolist() == [64, 64, 255]


def test_load_slice_mix_interpolates_in_hu_before_windowing(tmp_path):
    # z = 5 mm, interval 2 mm around key slice 5: previous = 0.4 * slice 4 + 0.6 * slice 5, next = 0.6 * 5 + 0.4 * 6
    paths = {i: _write_hu(tmp_path / f"{i:03d}.png", hu) for i, hu in ((4, -300), (5, 100), (6, 300))}
    channels = [[(paths[i], w) for i, w in channel] for channel in channel_slices(5, 4, 6, 5.0, 2.0)]
    image = load_slice_mix(channels, (-160, 240))
    # HU: -60, 100, 180 -> (HU + 160) * 255 / 400 = 63.75, 165.75, 216.75 -> rounded
    assert image.shape == (4, 6, 3) and (image == np.array([64, 166, 217], dtype=np.uint8)).all()
    # (windowing each slice first would clip -300 and 300 HU and give 0.6 * 165.75 = 99, 0.6 * 165.75 + 0.4 * 255 = 202)


def test_load_slice_mix_errors_name_the_file(tmp_path):
    key = _write_hu(tmp_path / "2.png", 0)
    missing = str(tmp_path / "1.png")
    with pytest.raises(FileNotFoundError, match=missing):
        load_slice_mix(_single(missing, key, key), (-1024, 3071))
    with pytest.raises(FileNotFoundError, match=f"{missing}: CT slice missing.*Images_png archives"):
        load_slice_mix([[(key, 0.6), (missing, 0.4)], [(key, 1.0)], [(key, 1.0)]], (-1024, 3071))  # interpolation only
    eight_bit = str(tmp_path / "8bit.png")
    cv2.imwrite(eight_bit, np.zeros((4, 6), dtype=np.uint8))
    with pytest.raises(ValueError, match=f"{eight_bit}: expected a single-channel 16-bit PNG"):
        load_slice_mix(_single(eight_bit, key, key), (-1024, 3071))
    other_size = _write_hu(tmp_path / "3.png", 0, shape=(5, 6))
    with pytest.raises(ValueError, match="differ in size"):
        load_slice_mix(_single(key, key, other_size), (-1024, 3071))
