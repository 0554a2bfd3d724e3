"""From a stored image to the model's input, against oracles computed here from PIL and numpy: the resize and the
centre and random crops, the flip, 16-bit, float and 32-bit integer images, EXIF orientation, the channel check's
majority rule, the [-1, 1] → uint8 conversion of samples, each example's own flip, a row's fingerprint and the default
number of decoding workers. (Until 2026-11-29 e these were checked only through a
stored checkpoint's square grey images: a mutation audit found 14 planted bugs here that no test saw.)"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf.data.decoding import check_channels, decoded_image, prepare_image
from ddpm_hf.images import to_uint8


def _colour(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _encoded(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("width,height", [(33, 23), (23, 33), (41, 20), (16, 25)])
def test_the_centre_crop_is_the_shorter_side_resized_then_the_middle(width, height):
    """The shorter side resized to the resolution (PIL bilinear, the longer side rounded in proportion), then the
    middle square, its offset floor of half the margin (odd margins here: 7, 7, 17 and 9), channels first. Oracle:
    the same steps written with PIL, pixel for pixel."""
    resolution, image = 16, _colour(width, height, width * height)
    shorter = min(width, height)
    size = (resolution, round(height * resolution / width)) if width == shorter else \
        (round(width * resolution / height), resolution)
    resized = np.asarray(image.resize(size, Image.BILINEAR) if size != (width, height) else image)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    expected = resized[top:top + resolution, left:left + resolution].transpose(2, 0, 1)
    got = prepare_image(image, resolution, 3, center_crop=True, flip=False, rng=np.random.default_rng(0))
    assert got.dtype == np.uint8 and got.shape == (3, resolution, resolution)
    np.testing.assert_array_equal(got, expected)


def test_the_random_crop_takes_every_offset_about_equally():
    """--no-center_crop: a 20 × 16 image at 16 has 5 crops. Each of 1000 draws is exactly one of them (brute force),
    and each offset comes 200 ± 76 times (6 binomial standard deviations). An image of the resolution comes whole."""
    image = _colour(20, 16, 1)
    pixels = np.asarray(image)
    crops = [pixels[:, x:x + 16].transpose(2, 0, 1) for x in range(5)]
    counts = np.zeros(5, dtype=int)
    for seed in range(1000):
        got = prepare_image(image, 16, 3, center_crop=False, flip=False, rng=np.random.default_rng(seed))
        hits = [k for k, crop in enumerate(crops) if np.array_equal(got, crop)]
        assert len(hits) == 1, seed
        counts[hits[0]] += 1
    assert counts.min() > 124 and counts.max() < 276, counts
    square = _colour(16, 16, 2)
    np.testing.assert_array_equal(prepare_image(square, 16, 3, center_crop=False, flip=False,
                                                rng=np.random.default_rng(0)), np.asarray(square).transpose(2, 0, 1))


def test_the_flip_mirrors_left_and_right_half_of_the_time():
    """The paper's only augmentation: a horizontal flip (the width axis reversed), in 1000 ± 130 of 2000 draws (5.8
    standard deviations); never without --random_flip."""
    image = _colour(16, 16, 3)
    plain = np.asarray(image).transpose(2, 0, 1)
    mirrored = 0
    for seed in range(2000):
        got = prepare_image(image, 16, 3, center_crop=True, flip=True, rng=np.random.default_rng(seed))
        assert np.array_equal(got, plain) or np.array_equal(got, plain[:, :, ::-1]), seed
        mirrored += np.array_equal(got, plain[:, :, ::-1])
    assert 870 < mirrored < 1130, mirrored
    for seed in range(200):
        np.testing.assert_array_equal(prepare_image(image, 16, 3, center_crop=True, flip=False,
                                                    rng=np.random.default_rng(seed)), plain)


def test_a_sixteen_bit_png_reads_as_its_values_scaled_to_eight_bits():
    """Every 16-bit value v of 0..65535 (an I;16 PNG) reads as rint(v · 255 / 65535), computed in float64."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    image = decoded_image(_encoded(Image.fromarray(values)))
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8))


def test_float_and_integer_images_read_in_their_ranges():
    """A float image (mode F) in [0, 1], 1.0 itself included, reads as rint(v · 255); a 32-bit integer image (mode I)
    of 0..255 as those levels, and one holding 256 is refused."""
    floats = np.random.default_rng(4).random((16, 16), dtype=np.float32)
    floats[0, 0], floats[0, 1] = 0.0, 1.0
    got = prepare_image(Image.fromarray(floats, "F"), 16, 1, center_crop=True, flip=False,
                        rng=np.random.default_rng(0))[0]
    np.testing.assert_array_equal(got, np.rint(floats.astype(np.float64) * 255).astype(np.uint8))
    assert got[0, 1] == 255
    levels = np.arange(256, dtype=np.int32).reshape(16, 16)
    got = prepare_image(Image.fromarray(levels, "I"), 16, 1, center_crop=True, flip=False,
                        rng=np.random.default_rng(0))[0]
    np.testing.assert_array_equal(got, levels.astype(np.uint8))
    with pytest.raises(ValueError, match=r"mode I image with values in \[1, 256\]"):
        prepare_image(Image.fromarray(levels + 1, "I"), 16, 1, center_crop=True, flip=False,
                      rng=np.random.default_rng(0))


@pytest.mark.parametrize("orientation,upright", [(6, lambda a: np.rot90(a, k=-1)), (2, np.fliplr),
                                                 (3, lambda a: a[::-1, ::-1])])
def test_an_exif_orientation_is_applied(orientation, upright):
    """A phone's photo stores its pixels sideways with an EXIF Orientation tag: 6 (turned a quarter clockwise to
    view), 2 (mirrored), 3 (upside down). Oracle: numpy's rotation and flips of the stored pixels."""
    stored = np.random.default_rng(5).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    np.testing.assert_array_equal(np.asarray(decoded_image(_encoded(Image.fromarray(stored, "RGB"), exif=exif))),
                                  upright(stored))


def test_the_channel_check_refuses_only_a_majority_of_the_other_kind():
    """Every mix of up to 9 first images: refused exactly when the other kind (grey for a colour model, colour for a
    grey one) is more than half of them (brute force over the mixes)."""
    grey, colour = Image.new("L", (2, 2)), Image.new("RGB", (2, 2))
    for count in range(1, 10):
        for others in range(count + 1):
            for channels, (other, same) in ((1, (colour, grey)), (3, (grey, colour))):
                try:
                    check_channels([other] * others + [same] * (count - others), channels)
                    refused = False
                except ValueError:
                    refused = True
                assert refused == (others > count / 2), (count, others, channels)


def test_samples_become_the_nearest_level_clipped():
    """to_uint8 inverts k / 127.5 − 1 for every level k, clips values outside [−1, 1] (samples may leave it), and
    rounds to the nearest level: numpy's rint of the float64 value, away from ties."""
    levels = torch.arange(256)
    assert torch.equal(to_uint8(levels.float() / 127.5 - 1), levels.to(torch.uint8))
    assert to_uint8(torch.tensor([-5.0, -1.0001, 1.0001, 1.5, 3.0, 1e6, -1e6])).tolist() == [0, 0, 255, 255, 255, 255, 0]
    x = torch.linspace(-1, 1, 10007, dtype=torch.float32)
    expected = np.clip(x.double().numpy() / 2 + 0.5, 0, 1) * 255
    away_from_ties = np.abs(expected - np.floor(expected) - 0.5) > 1e-3
    np.testing.assert_array_equal(to_uint8(x).numpy()[away_from_ties],
                                  np.rint(expected)[away_from_ties].astype(np.uint8))


def test_each_example_draws_its_flip_anew_in_every_epoch_and_stream():
    """The flip of an example is drawn from its key (stream, epoch, row): row k of another epoch, or of another
    stream (another GPU's data), draws its own. Tied to the row alone, an example would be flipped alike in every
    epoch, and the streams' flips would be one sequence. Oracle: the unflipped image and its mirror, from numpy;
    over 64 rows, two keys' flip sequences agree by chance with probability 2⁻⁶⁴."""
    from ddpm_hf.data.decoding import DecodeSettings, decode_rows

    image = _colour(16, 16)
    upright = np.asarray(image).transpose(2, 0, 1)
    settings = DecodeSettings(resolution=16, channels=3, center_crop=True, random_flip=True, seed=0, record_ids=False)

    def flips(v: int, epoch: int) -> list:
        rows = decode_rows([{"bytes": _encoded(image), "path": None}] * 64, [(v, epoch, i) for i in range(64)],
                           settings)
        assert all(np.array_equal(a, upright) or np.array_equal(a, upright[:, :, ::-1]) for a, _ in rows)
        return [not np.array_equal(a, upright) for a, _ in rows]

    first = flips(0, 0)
    assert 16 < sum(first) < 48  # about half of them
    assert flips(0, 1) != first and flips(1, 0) != first
    assert flips(0, 0) == first  # the same key, the same flip: whichever worker or process decodes it


def test_a_rows_fingerprint_is_its_whole_bytes():
    """A resume knows a row by its fingerprint: rows of the same length that differ only near their end (JPEGs of one
    camera share long headers) must differ in it. Oracle: zlib's CRC-32 of all the bytes; a file by its name."""
    import zlib

    from ddpm_hf.data import row_fingerprint

    head = bytes(range(256)) * 4
    a, b = head + b"\x00", head + b"\x01"
    assert row_fingerprint({"bytes": a}) == f"{len(a)}:{zlib.crc32(a):08x}" != row_fingerprint({"bytes": b})
    assert row_fingerprint({"bytes": None, "path": "/data/001.png"}) == "path:/data/001.png"


def test_the_default_workers_share_the_cores_among_the_machines_processes(monkeypatch):
    """Without --dataloader_num_workers, each training process decodes in the cores left after one per process,
    shared among the machine's processes, at most 8 each: 8 processes on 32 cores do not start 8 workers each."""
    from ddpm_hf.data import reader

    monkeypatch.setattr(reader, "usable_cores", lambda: 32)
    assert [reader.default_num_workers(n) for n in (1, 2, 4, 8, 32)] == [8, 8, 7, 3, 0]
