"""Image files: which keys are images, their sizes from headers, and decoding to a bucket.

The scanner reads only a bounded prefix of each file (`read_range`) and lets PIL parse
the header without decoding pixels, so scanning 100,000 images costs 100,000 small reads.
The loader decodes with `load_image`: EXIF orientation applied, transparency flattened on
white, scaled to cover the bucket and center-cropped. Everything goes through the
`Storage` interface, so S3 roots take the same path as local folders. Torch-free.
"""

from __future__ import annotations

import io
import math
import struct

from PIL import Image, ImageOps, UnidentifiedImageError

from ..storage import Storage, join_uri

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
"""Image file extensions (compared lower-cased)."""
HEADER_BYTES = 64 * 1024
"""Prefix read to find an image's size; a header that does not fit is read in full."""
IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and truncated data
    ValueError,
    SyntaxError,  # raised by some PIL plugins for malformed headers
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)
"""What PIL raises for a corrupt, truncated or hostile file."""
_SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


class ImageLoadError(ValueError):
    """An image could not be read or decoded; the message names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def is_image_key(key: str) -> bool:
    """Whether the key names an image by its extension."""
    dot = key.rfind(".")
    return dot > key.rfind("/") and key[dot:].lower() in IMAGE_EXTENSIONS


def _reason(exc: BaseException) -> str:
    """PIL's error without its object reprs (`<_io.BytesIO object at 0x...>`)."""
    if isinstance(exc, UnidentifiedImageError):
        return "unrecognised format or corrupt header"
    return str(exc) or type(exc).__name__


def _displayed_size(data: bytes) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, from the header only (no pixel decode)."""
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        raw_exif = img.info.get("exif")
    if isinstance(raw_exif, bytes):
        exif = Image.Exif()
        exif.load(raw_exif)
        if exif.get(_ORIENTATION_TAG) in _SWAPPED_ORIENTATIONS:
            width, height = height, width
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    return width, height


def read_image_size(storage: Storage, key: str) -> tuple[int, int]:
    """The displayed (width, height), parsed from a prefix of the file (the whole file when
    the header does not fit). Raises ImageLoadError for an unreadable image; storage
    failures other than a missing file propagate."""
    path = join_uri(storage.uri, key)
    try:
        head = storage.read_range(key, 0, HEADER_BYTES)
        try:
            return _displayed_size(head)
        except IMAGE_ERRORS:
            if len(head) < HEADER_BYTES:
                raise
        return _displayed_size(storage.read_bytes(key))
    except FileNotFoundError as exc:
        raise ImageLoadError(path, "file disappeared during the scan") from exc
    except IMAGE_ERRORS as exc:
        raise ImageLoadError(path, f"not a readable image: {_reason(exc)}") from exc


def _flatten(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def cover_crop(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale to cover `bucket` and crop the center: the bucket's aspect is cut from the
    middle of the image and resampled in one step (Lanczos)."""
    target_w, target_h = bucket
    width, height = img.size
    if width * target_h > target_w * height:  # wider than the bucket: trim the sides
        crop_w = height * target_w / target_h
        box = ((width - crop_w) / 2, 0.0, (width + crop_w) / 2, float(height))
    else:  # taller than the bucket: trim top and bottom
        crop_h = width * target_h / target_w
        box = (0.0, (height - crop_h) / 2, float(width), (height + crop_h) / 2)
    return img.resize(bucket, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def load_image(storage: Storage, key: str, bucket: tuple[int, int]) -> Image.Image:
    """Decode an image to an RGB PIL image of exactly `bucket` (width, height).

    Raises ImageLoadError naming the file when it is missing, corrupt or truncated.
    """
    path = join_uri(storage.uri, key)
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError as exc:
        raise ImageLoadError(path, "file not found (deleted after the scan?)") from exc
    try:
        with Image.open(io.BytesIO(data)) as img:
            raw_w, raw_h = img.size
            rotated = img.getexif().get(_ORIENTATION_TAG) in _SWAPPED_ORIENTATIONS
            shown_w, shown_h = (raw_h, raw_w) if rotated else (raw_w, raw_h)
            scale = max(bucket[0] / shown_w, bucket[1] / shown_h)
            if scale < 1:  # let the JPEG decoder downscale by 2/4/8 while staying >= the cover size
                img.draft("RGB", (math.ceil(raw_w * scale), math.ceil(raw_h * scale)))
            upright = ImageOps.exif_transpose(img)
            return cover_crop(_flatten(upright), bucket)
    except IMAGE_ERRORS as exc:
        raise ImageLoadError(path, f"cannot decode image: {_reason(exc)}") from exc
