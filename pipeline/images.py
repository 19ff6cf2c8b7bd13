"""Robust image decoding: any bytes in, an ``HxWx3`` uint8 RGB array or an :class:`ImageDecodeError` out.

The annotation pipeline must turn every input sample into either a label or an error record, so this
module never lets a broken image crash a CPU task: every failure becomes an :class:`ImageDecodeError`
(a ``ValueError``) with a short, stable reason that ends up in the ``error`` column of the output.

Rules (in this order):

1. Zero bytes -> ``"empty (0 bytes)"``.
2. The header is parsed (:func:`PIL.Image.open` is lazy) and the image size is checked against
   ``max_pixels`` *before* any pixel is decoded -> ``"too large: WxH pixels > limit N"``. Pillow's own
   decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, which raises above twice that value) is left
   as it is (we never change Pillow's global settings) and its error is reported the same way.
3. Unknown formats, and formats outside :data:`ALLOWED_FORMATS` (e.g. EPS, which Pillow decodes by
   running Ghostscript) -> ``"not an image (unidentified format)"``; short reads -> ``"truncated image"``;
   anything else Pillow raises -> ``"corrupt image (<exception type>: <message>)"`` (each reason has its
   :mod:`pipeline.errors` kind in ``ImageDecodeError.error_kind``; a host ``MemoryError`` is re-raised as
   it is, never reported as a corrupt image). Truncated images are
   never accepted (``ImageFile.LOAD_TRUNCATED_IMAGES`` is not touched; if another library set it to True,
   truncated images would decode with grey bottoms, which we cannot detect).
4. EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`); a broken EXIF block is ignored.
5. Pixel modes are converted to 8-bit RGB:

   ==========================  =========================================================================
   mode                        conversion
   ==========================  =========================================================================
   RGB                         as is
   L, 1, P (no transparency),   Pillow's ``convert("RGB")`` (CMYK: Pillow's naive conversion, Adobe
   CMYK, YCbCr, RGBX, LAB, HSV  inverted CMYK JPEGs are handled by the JPEG decoder; ICC profiles ignored)
   anything with alpha (LA,     alpha composited onto **white** (what a viewer shows on a white page; the
   RGBA, PA, La, RGBa, P or L   model never sees alpha). Fully transparent pixels become white.
   with a transparency key)
   I;16, I;16B, I;16L, I;16N   16-bit: ``round(v * 255 / 65535)`` (scaled, never clipped)
   I (32-bit int)              values within [0, 65535] scaled as 16-bit; otherwise min-max stretched
   F (32-bit float)            values within [0, 1] multiplied by 255; otherwise min-max stretched
   ==========================  =========================================================================

Pillow warnings raised while decoding (``DecompressionBombWarning``, "Possibly corrupt EXIF data",
palette-transparency notes ...) are captured and logged at DEBUG, so they never surface as exceptions
in callers that run with ``-W error``. Multi-frame images (GIF, TIFF pages) give their first frame.
"""

from __future__ import annotations

import io
import logging
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ALLOWED_FORMATS", "DEFAULT_MAX_PIXELS", "ImageDecodeError", "decode_image", "image_size"]

log = logging.getLogger(__name__)

#: Default pixel limit: half of Pillow's default ``MAX_IMAGE_PIXELS`` (89,478,485), i.e. about 44.7
#: megapixels (e.g. 6680x6680). Decoding such an image takes ~134 MB as RGB, safe for a CPU task.
DEFAULT_MAX_PIXELS = 89_478_485 // 2

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


#: Pillow formats we open. Others (EPS/PS would run Ghostscript, PDF, fonts, ...) are "not an image".
ALLOWED_FORMATS = (
    "JPEG",
    "MPO",
    "PNG",
    "WEBP",
    "BMP",
    "DIB",
    "TIFF",
    "GIF",
    "PPM",
    "JPEG2000",
    "TGA",
    "AVIF",
)


def _allowed_formats() -> list[str]:
    Image.init()  # registers the plugins once; cheap afterwards
    return [f for f in ALLOWED_FORMATS if f in Image.OPEN]


class ImageDecodeError(ValueError):
    """An input could not be decoded into an image; ``str(err)`` is a short reason for the error column.

    ``error_kind`` is its :mod:`pipeline.errors` kind: ``not_an_image``, ``corrupt_image``,
    ``truncated_image`` or ``image_too_large`` (none of them retryable).
    """

    def __init__(self, message: str, error_kind: str = "corrupt_image") -> None:
        super().__init__(message)
        self.error_kind = error_kind


def _kind_of(reason: str) -> str:
    if reason.startswith(("empty", "not an image")):
        return "not_an_image"
    if reason.startswith("too large"):
        return "image_too_large"
    if reason.startswith("truncated"):
        return "truncated_image"
    return "corrupt_image"


def _fail(reason: str, source: str) -> ImageDecodeError:
    return ImageDecodeError(f"{reason} [{source}]" if source else reason, _kind_of(reason))


def _classify(exc: BaseException) -> str:
    """Short reason for an exception raised by a Pillow decoder."""
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncat" in text or "end of file" in text:
        return "truncated image"
    return f"corrupt image ({type(exc).__name__}: {exc})"


def _too_large_from_pillow(exc: Exception, max_pixels: int) -> str:
    """Turn Pillow's ``DecompressionBombError`` message into our wording (it has no dimensions)."""
    match = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(exc))
    if match:
        return f"too large: {match.group(1)} pixels > limit {min(max_pixels, int(match.group(2)))}"
    return f"too large: {exc}"


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the header only, or raise :class:`ImageDecodeError`; no pixels are decoded."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            with Image.open(io.BytesIO(data), formats=_allowed_formats()) as im:
                return int(im.width), int(im.height)
        except Image.DecompressionBombError as exc:
            raise _fail(_too_large_from_pillow(exc, DEFAULT_MAX_PIXELS), "") from None
        except UnidentifiedImageError:
            raise _fail("not an image (unidentified format)", "") from None
        except Exception as exc:  # noqa: BLE001 - any parser failure is a decode error
            raise _fail(_classify(exc), "") from None


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Min-max stretch any real array to uint8 [0, 255]; a constant image becomes 0."""
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    arr = np.where(finite, arr, lo)
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _high_depth_to_gray8(im: Image.Image) -> np.ndarray:
    """``HxW`` uint8 from a single-band 16-bit / 32-bit int / float image (rules in the module doc)."""
    arr = np.asarray(im)
    if im.mode in _SIXTEEN_BIT_MODES:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if im.mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:
            return ((arr.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
        return _stretch(arr)
    # mode F
    finite = arr[np.isfinite(arr)]
    if finite.size and float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0:
        return np.round(np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0) * 255.0).astype(np.uint8)
    return _stretch(arr)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """``HxWx3`` uint8 RGB from a loaded image of any mode (rules in the module doc)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES or mode in {"I", "F"}:
        gray = _high_depth_to_gray8(im)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    if mode == "1":
        im = im.convert("L")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, WebP, BMP, TIFF, GIF, ...) to RGB pixels.

    Args:
        data: the encoded file's bytes.
        max_pixels: largest accepted ``width * height``; checked from the header before decoding.
        source: where the bytes came from (shard/key); appended to error messages in brackets.

    Returns:
        ``HxWx3`` uint8 array, RGB, values in [0, 255], C-contiguous, EXIF orientation applied
        (so ``H, W`` are the displayed size, which may be the stored size transposed).

    Raises:
        ImageDecodeError: empty, unidentified, truncated, corrupt, too large or unsupported input
            (``error_kind`` says which).
        MemoryError: the host ran out of memory while decoding: not the image's fault, so it is not turned
            into a decode error (the annotate pipeline records it as ``out_of_memory``, retryable).
    """
    if not data:
        raise _fail("empty (0 bytes)", source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # 1. header only: format and size.
            try:
                im = Image.open(io.BytesIO(data), formats=_allowed_formats())
            except Image.DecompressionBombError as exc:
                raise _fail(_too_large_from_pillow(exc, max_pixels), source) from None
            except UnidentifiedImageError:
                raise _fail("not an image (unidentified format)", source) from None
            # 2. size guard before any pixel is decoded.
            if im.width * im.height > max_pixels:
                raise _fail(f"too large: {im.width}x{im.height} pixels > limit {max_pixels}", source)
            if im.width == 0 or im.height == 0:
                raise _fail(f"empty image ({im.width}x{im.height})", source)
            # 3. decode pixels.
            try:
                im.load()
            except MemoryError:
                raise
            except Image.DecompressionBombError as exc:
                raise _fail(_too_large_from_pillow(exc, max_pixels), source) from None
            except (OSError, EOFError, SyntaxError, ValueError) as exc:
                raise _fail(_classify(exc), source) from None
            # 4. EXIF orientation; a broken EXIF block must not lose the image.
            try:
                if im.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):  # skip the copy when upright
                    im = ImageOps.exif_transpose(im)
            except Exception as exc:  # noqa: BLE001
                log.debug("ignoring unusable EXIF orientation %s: %s", source, exc)
            # 5. mode -> 8-bit RGB.
            try:
                rgb = _to_rgb_array(im)
            except (ValueError, OSError) as exc:
                raise _fail(f"unsupported image mode {im.mode!r} ({exc})", source) from None
        except (ImageDecodeError, MemoryError):
            raise  # out of memory is not a property of the image: the caller records it as retryable
        except Exception as exc:  # noqa: BLE001 - last line of defence: plugin bugs, struct errors...
            raise _fail(_classify(exc), source) from None
    for w in caught:
        log.debug("Pillow warning while decoding %s: %s", source or "<bytes>", w.message)
    if rgb.ndim != 3 or rgb.shape[2] != 3:  # internal invariant
        raise _fail(f"unsupported image layout {rgb.shape}", source)
    return np.ascontiguousarray(rgb, dtype=np.uint8)
