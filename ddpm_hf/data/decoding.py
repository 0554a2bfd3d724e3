"""From an image cell to the model's input: its bytes (a remote file's read tried again), the decoded image, its
channels, the resize, crop and flip (``prepare_image``), and the decoding of a batch's rows as a worker runs it
(``decode_rows``)."""

import hashlib
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..errors import http_status


def is_remote(path: str) -> bool:
    """A path that datasets reads over the network: a file of a Hub repo (hf://, as a Hub image folder's cells point
    at theirs) or a URL."""
    return "://" in path


def image_cell_bytes(cell: dict, token: Optional[str] = None) -> bytes:
    """The encoded image of an undecoded ``Image`` cell (``{"bytes", "path"}``): its bytes, or its file's, read from
    the Hub or a URL with ``token`` (None: HF_TOKEN or the stored login) through datasets, which retries the read."""
    if cell is None or (cell.get("bytes") is None and cell.get("path") is None):  # a null cell, a sample without it
        raise ValueError("the row has no image (its image column is empty)")
    if cell.get("bytes") is not None:
        return cell["bytes"]
    path = cell["path"]
    if not is_remote(path):
        return Path(path).read_bytes()
    from datasets import DownloadConfig
    from datasets.utils.file_utils import xopen

    with xopen(path, "rb", download_config=DownloadConfig(token=token)) as remote:
        return remote.read()


def decoded_image(data: bytes) -> Image.Image:
    """The image encoded in ``data``, fully decoded (a truncated file fails here, not later), turned upright as its
    EXIF orientation says (a phone's photo; as datasets' Image feature and browsers show it), and in 8-bit values
    (see :func:`_eight_bit`: an image whose values are neither fails here)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.getexif().get(ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return _eight_bit(image)


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L")  # how Pillow opens 16-bit grey PNGs and TIFFs


def image_channels(image: Image.Image) -> int:
    """1 for grey modes (L, LA, 1, I, I;16, F), 3 for colour ones (RGB, RGBA, P, CMYK, YCbCr, ...)."""
    return 1 if image.mode in ("1", "L", "LA", "La", "I", "F", *SIXTEEN_BIT_MODES) else 3


def undecoded_images(dataset, image_column: str):
    """Only the image column, as encoded bytes/paths: decoding is ours, so a corrupt image can be skipped. (datasets
    streams a Hub image folder through decoding threads of its own, which a cast to undecoded images leaves in place;
    ``decode(False)`` removes them.)"""
    from datasets import Image as ImageFeature

    dataset = dataset.decode(False) if hasattr(dataset, "decode") else dataset
    return dataset.cast_column(image_column, ImageFeature(decode=False)).select_columns([image_column])


CHANNEL_CHECK_IMAGES = 8  # the first images the channel check reads


def first_images(dataset, image_column: str, count: int = CHANNEL_CHECK_IMAGES, max_rows: int = 100,
                 token: Optional[str] = None) -> List[Image.Image]:
    """The first ``count`` decodable images of ``dataset``, among its first ``max_rows`` rows (nothing else is read):
    the data's channels, and a clear error on an empty or undecodable dataset, before the model is trained."""
    rows = undecoded_images(dataset, image_column).take(max_rows)
    images, seen, last_error = [], 0, None
    for seen, row in enumerate(rows, 1):
        try:
            images.append(decoded_image(image_cell_bytes(row[image_column], token)))
        except Exception as err:
            last_error = err
        if len(images) == count:
            break
    if images:
        return images
    if seen == 0:
        raise ValueError("the dataset has no rows: check --split and the data files.")
    raise ValueError(f"none of the first {seen} images of the dataset could be decoded (last error: {last_error}); "
                     f"is {image_column!r} the image column?")


def check_channels(images: List[Image.Image], in_channels: int,
                   other_model: str = "a preset, --model_config or --pretrained_model_name_or_path") -> None:
    """The model's input channels must match the data: training a 3-channel model on grey images (or the reverse)
    would silently learn replicated or discarded channels. Refused when most of ``images`` (the data's first) are of
    the other kind: colour datasets hold a few grey images (about 2 % of ImageNet's), converted like the rest.
    ``other_model``: how the command that reads the data takes another model (training's flags by default)."""
    if in_channels not in (1, 3):
        raise ValueError(f"the model has in_channels={in_channels}; only 1 (grey) and 3 (colour) image data exist.")
    others = [image for image in images if image_channels(image) != in_channels]
    if 2 * len(others) > len(images):
        kind = {1: "grey", 3: "colour"}
        channels = 4 - in_channels
        modes = ", ".join(dict.fromkeys(image.mode for image in others))
        first = (f", {'all' if len(others) == len(images) else len(others)} of its first {len(images)}"
                 if len(images) > 1 else "")
        raise ValueError(f"the model has in_channels={in_channels} ({kind[in_channels]}) but the dataset's images are "
                         f"{kind[channels]} (mode {modes}){first}: use a model with in_channels={channels} "
                         f"({other_model}), or convert the dataset.")


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grey image scaled to 8 bits (round(v · 255 / 65535)); Pillow's convert("L") clips it instead, every
    value from 255 up (a 16-bit image's range: 0 to 65535) turning white. A float image (mode F: datasets stores a
    float array so) with every value in [0, 1] is read in that range, the float images' convention (round(v · 255));
    before, it became black. The 32-bit modes (I, F) say nothing else of their range: values outside 0..255 are
    refused (the stream skips and counts such an image, naming it), not clipped. Other modes as they are."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode in ("I", "F"):
        low, high = image.getextrema()
        if image.mode == "F" and 0 <= low and high <= 1:
            return Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) * 255).astype(np.uint8), "L")
        if low < 0 or high > 255:
            raise ValueError(f"a mode {image.mode} image with values in [{low:g}, {high:g}]: 8-bit values (0 to 255), "
                             "floats in [0, 1] or 16-bit PNGs are read; convert the dataset's images to one of these")
    return image


def prepare_image(image: Image.Image, resolution: int, channels: int, center_crop: bool, flip: bool,
                  rng: np.random.Generator) -> np.ndarray:
    """PIL image → uint8 (C, H, W): model's channels, shorter side resized to ``resolution`` (bilinear), centre or
    random crop, optional horizontal flip (the paper's only augmentation)."""
    image = _eight_bit(image).convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.BILINEAR)
        w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, channels)
    if flip and rng.random() < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


@dataclass(frozen=True)
class DecodeSettings:
    resolution: int
    channels: int
    center_crop: bool
    random_flip: bool
    seed: int
    record_ids: bool
    token: Optional[str] = None  # for images that are files of a Hub repo


def decode_rows(cells: List[dict], keys: List[Tuple[int, int, int]], settings: DecodeSettings) -> list:
    """Decode and augment image cells; ``keys`` are their (stream, epoch, row). Each result is (uint8 array, sha1 or
    None) or (None, error message). The augmentation's randomness is tied to the example's key, so the result is the
    same whichever process or worker decodes it. Runs in the data workers (a pure function of its arguments)."""
    results = []
    for cell, (v, epoch, index) in zip(cells, keys):
        try:
            data = _read_image_cell(cell, settings.token)
        except _Unreadable as err:  # a local file missing or unreadable, a remote one gone for good (404)
            results.append((None, str(err)))
            continue
        except OSError as err:
            raise OSError(f"stream {v}, epoch {epoch}, row {index}: {err}") from err
        try:
            image = decoded_image(data)
        except Exception as err:  # a corrupt or truncated file, or one of values no 8-bit image has, must not stop a
            # long run; named by its file where it has one (Pillow names the bytes it was given)
            named = f"{cell['path']}: " if isinstance(cell, dict) and cell.get("path") else ""
            said = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
            results.append((None, f"{named}{type(err).__name__}: {said}"))
            continue
        rng = np.random.default_rng([settings.seed, v, epoch, index])
        array = prepare_image(image, settings.resolution, settings.channels, settings.center_crop,
                              settings.random_flip, rng)
        results.append((array, hashlib.sha1(data).hexdigest() if settings.record_ids else None))
    return results


REMOTE_READ_ATTEMPTS = 4  # tries of an image file on the Hub or at a URL (pauses of 1, 2, 4 s between)
REMOTE_READ_PAUSE_S = 1.0


class _Unreadable(Exception):
    """An image file that is not there (locally, or gone from its URL for good): skipped and counted, the same in
    every run over the data."""


def _not_found(err: BaseException) -> bool:
    """A missing file: FileNotFoundError, or an HTTP 404 anywhere in the error's chain (a range read's)."""
    while err is not None:
        if isinstance(err, FileNotFoundError) or http_status(err) == 404:
            return True
        err = err.__cause__ or err.__context__
    return False


def _read_image_cell(cell: dict, token: Optional[str]) -> bytes:
    """:func:`image_cell_bytes`, a remote file's read tried again after a pause (a 404 too: a Hub's may pass). A file
    that is not there (locally, or still not at its URL) raises :class:`_Unreadable`; a remote file unreadable for
    another reason raises OSError (skipping it would change the data)."""
    remote = cell is not None and cell.get("bytes") is None and is_remote(cell.get("path") or "")
    attempt = 1
    while True:
        try:
            return image_cell_bytes(cell, token)
        except Exception as err:
            if not remote or (attempt == REMOTE_READ_ATTEMPTS and _not_found(err)):
                raise _Unreadable(f"{type(err).__name__}: {err}") from err
            if attempt == REMOTE_READ_ATTEMPTS:
                raise OSError(f"cannot read {cell['path']} after {attempt} tries: {type(err).__name__}: {err}") from err
        time.sleep(REMOTE_READ_PAUSE_S * 2 ** (attempt - 1))
        attempt += 1
