"""Client images in, worker images out. Images arrive only as bytes (data URLs or request bodies);
nothing a client sends is ever treated as a path or fetched as a URL."""

from __future__ import annotations

import base64
import binascii
import io
import os
import threading
import weakref
from typing import Any

# Media types a client may declare for an upload. DICOM and NIfTI have no registered image/* type;
# the decoder (``mmedagent.imaging``) sniffs the bytes, the declared type is only a first filter.
ACCEPTED_MEDIA_TYPES = frozenset(
    {
        "image/png", "image/jpeg", "image/jpg", "image/bmp", "image/tiff", "image/webp", "image/gif",
        "application/dicom", "application/x-nifti", "application/gzip", "application/x-gzip",
        "application/octet-stream",
    }
)


_DECODE_SLOTS = threading.BoundedSemaphore(2)
"""Uploads decoded at once in one process: a large image can take gigabytes while it decodes, so
concurrent ones wait their turn instead of exhausting the server's memory together."""


def pixel_limit(size: int) -> int:
    """The most pixels an upload of ``size`` bytes may decode to: 32 a byte (a decompression bomb
    packs thousands; scans and photos far fewer), at least 32 M (a mammogram in a small JPEG), at most
    :data:`mmedagent.imaging.MAX_PIXELS`; exactly that where the operator set ``MMEDAGENT_MAX_PIXELS``."""
    from mmedagent.imaging import MAX_PIXELS

    if os.environ.get("MMEDAGENT_MAX_PIXELS"):
        return MAX_PIXELS
    return min(MAX_PIXELS, max(32 << 20, 32 * size))


class UploadError(ValueError):
    """A client image that cannot be used; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def split_data_url(url: str, max_bytes: int) -> tuple[str, bytes]:
    """``data:<type>;base64,<payload>`` → (media type, bytes). Anything else is refused."""
    if not isinstance(url, str) or not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if isinstance(url, str) and ":" in url[:16] else "a path"
        raise UploadError(400, f"images must be sent inline as base64 data URLs; {scheme} is not accepted")
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise UploadError(400, "image data URL must be base64 encoded (data:<type>;base64,...)")
    media_type = header[: -len(";base64")].split(";")[0].strip().lower() or "application/octet-stream"
    if media_type not in ACCEPTED_MEDIA_TYPES:
        raise UploadError(415, f"unsupported image type {media_type!r}; send PNG, JPEG, DICOM or NIfTI")
    if len(payload) * 3 // 4 > max_bytes:
        raise UploadError(413, f"image is larger than the upload limit ({max_bytes} bytes)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(400, "image data URL is not valid base64") from None
    return media_type, data


def decode_image(data: bytes, media_type: str = "application/octet-stream", max_bytes: int | None = None,
                 **view: Any):
    """Bytes → :class:`mmedagent.imaging.MedicalImage` (PIL RGB + de-identified metadata); ``view``:
    :func:`~mmedagent.imaging.load_image`'s ``window``, ``slice_index``, ``plane``, ``volume``."""
    from mmedagent.imaging import ImageLoadError, load_image

    if media_type not in ACCEPTED_MEDIA_TYPES:
        raise UploadError(415, f"unsupported image type {media_type!r}; send PNG, JPEG, DICOM or NIfTI")
    if not data:
        raise UploadError(400, "image is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise UploadError(413, f"image is larger than the upload limit ({max_bytes} bytes)")
    try:
        with _DECODE_SLOTS:
            return load_image(bytes(data), max_pixels=pixel_limit(len(data)), **view)
    except ImageLoadError as e:
        raise UploadError(400, f"could not read the image: {e}") from None


def image_from_data_url(url: str, max_bytes: int):
    media_type, data = split_data_url(url, max_bytes)
    return decode_image(data, media_type, max_bytes)


_png_cache: dict[int, str] = {}
_png_lock = threading.Lock()


def png_data_url(image) -> str:
    """A PIL image as a PNG data URL (a grey image as one channel, a third of the size; decoding
    gives the same RGB image back), encoded once per image object (every tool call and model pass of
    a conversation reuses it; the entry goes when the image is garbage-collected)."""
    key = id(image)
    with _png_lock:
        cached = _png_cache.get(key)
    if cached is not None:
        return cached
    buf = io.BytesIO()
    _grey_as_one_channel(image).save(buf, format="PNG", compress_level=1)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    with _png_lock:
        if key not in _png_cache:
            _png_cache[key] = url
            weakref.finalize(image, _png_cache.pop, key, None)
    return url


def _grey_as_one_channel(image):
    if image.mode != "RGB":
        return image
    import numpy as np

    px = np.asarray(image)
    grey = np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 1], px[..., 2])
    return image.convert("L") if grey else image


def sendable_png(image, max_bytes: int) -> str:
    """:func:`png_data_url`, or an :class:`UploadError` when the PNG is over ``max_bytes`` (every
    server refuses larger images): a client learns it when the image is loaded, not from each tool."""
    url = png_data_url(image)
    size = (len(url) - url.index(",") - 1) * 3 // 4
    if size > max_bytes:
        raise UploadError(413, f"the image is {size / 2**20:.1f} MB as the lossless PNG the server passes to its models and "
                               f"tools, more than its upload limit ({max_bytes / 2**20:.1f} MB, max_upload_mb): "
                               "downscale it, or raise max_upload_mb")
    return url
