"""pipeline.images: real encodings of photo-like images, every pixel mode, and broken inputs."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, image_size


def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Photo-like ``HxWx3`` uint8: smooth gradients (sky/ground), a disc, a box, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * xx / w, 255 * yy / h, 128 + 60 * np.sin(xx / 5.0)], axis=-1)
    img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 4) ** 2] = (220, 40, 30)
    img[h // 5 : h // 2, int(w * 0.6) : int(w * 0.9)] = (30, 60, 200)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` (valid CRC): a decompression bomb costing 0 bytes."""
    i = png.index(b"IHDR")
    body = struct.pack(">II", width, height) + png[i + 12 : i + 17]
    return png[: i + 4] + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + png[i + 21 :]


def _check(out: np.ndarray, shape: tuple[int, int]) -> None:
    assert out.dtype == np.uint8 and out.shape == (*shape, 3) and out.flags.c_contiguous


@pytest.mark.parametrize("fmt,tol", [("PNG", 0), ("BMP", 0), ("TIFF", 0), ("WEBP", 12), ("JPEG", 12)])
def test_common_formats_roundtrip(fmt: str, tol: float) -> None:
    img = photo()
    kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    out = decode_image(encode(Image.fromarray(img), fmt, **kwargs))
    _check(out, img.shape[:2])
    assert np.abs(out.astype(int) - img).mean() <= tol


def test_exif_orientation_is_applied() -> None:
    stored = photo(40, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data)
    _check(out, (80, 40))
    assert np.abs(out.astype(int) - np.rot90(stored, k=-1)).mean() < 12
    assert image_size(data) == (80, 40)  # (width, height) as stored, from the header only


def test_cmyk_jpeg_is_converted() -> None:
    img = photo()
    out = decode_image(encode(Image.fromarray(img).convert("CMYK"), "JPEG", quality=95))
    _check(out, img.shape[:2])
    assert np.abs(out.astype(int) - img).mean() < 15


def test_16bit_png_is_scaled_not_clipped() -> None:
    a16 = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    data = encode(Image.fromarray(a16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    _check(out, a16.shape)
    expected = np.round(a16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 0], out[..., 2])
    assert out.max() == 255 and 100 < out[24, 32, 0] < 156


def test_32bit_int_and_float_tiff() -> None:
    ints = (np.arange(48 * 64).reshape(48, 64) * 20).astype(np.int32)  # 0..61420: 16-bit range
    out = decode_image(encode(Image.fromarray(ints), "TIFF"))
    assert out[-1, -1, 0] == round(61420 * 255 / 65535) and out[0, 0, 0] == 0
    big = (np.arange(48 * 64).reshape(48, 64) * 1000).astype(np.int32)  # beyond 16 bit: stretched
    out = decode_image(encode(Image.fromarray(big), "TIFF"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    floats = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    out = decode_image(encode(Image.fromarray(floats), "TIFF"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_palette_with_transparency_composites_on_white() -> None:
    idx = np.zeros((32, 32), np.uint8)
    idx[8:24, 8:24] = 1
    im = Image.fromarray(idx, "P")
    im.putpalette([0, 0, 0, 200, 30, 20] + [0] * 762)
    out = decode_image(encode(im, "PNG", transparency=0))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[16, 16]) == (200, 30, 20)


def test_rgba_and_la_composite_on_white() -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :8, 3] = 255  # opaque red | fully transparent
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 15]) == (255, 255, 255)
    rgba[:, :, 3] = 128
    half = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert half[0, 0, 0] == 255 and 120 <= half[0, 0, 1] <= 135
    la = Image.fromarray(np.zeros((16, 16), np.uint8)).convert("LA")
    la.putalpha(Image.fromarray(np.where(np.arange(16)[None, :] < 8, 255, 0).repeat(16, 0).astype(np.uint8)))
    out = decode_image(encode(la, "PNG"))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 15]) == (255, 255, 255)


def test_grayscale_and_bilevel() -> None:
    gray = photo()[..., 1]
    out = decode_image(encode(Image.fromarray(gray), "PNG"))
    assert np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 2], gray)
    bilevel = Image.fromarray(gray > 128).convert("1")
    out = decode_image(encode(bilevel, "PNG"))
    assert set(np.unique(out).tolist()) <= {0, 255}


def test_animated_gif_first_frame() -> None:
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 240)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data)[0, 0, 0] < 40


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty (0 bytes)"),
        (np.random.default_rng(1).bytes(4096), "not an image (unidentified format)"),
        (b"<html>not an image</html>", "not an image (unidentified format)"),
        # EPS would make Pillow run Ghostscript: never opened.
        (
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
            "not an image (unidentified format)",
        ),
    ],
)
def test_non_images(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert str(err.value) == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_images_are_errors(fmt: str) -> None:
    data = encode(Image.fromarray(photo(96, 128)), fmt)
    with pytest.raises(ImageDecodeError, match=r"^truncated image|^corrupt image"):
        decode_image(data[: len(data) * 2 // 3])
    with (
        pytest.raises(ImageDecodeError, match="truncated image")
        if fmt != "WEBP"
        else pytest.raises(ImageDecodeError)
    ):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_rejected_from_header() -> None:
    png = encode(Image.fromarray(photo(8, 8)), "PNG")
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"^too large: "):
        decode_image(patch_png_size(png, 30000, 30000))  # beyond Pillow's own guard
    with pytest.raises(ImageDecodeError, match=rf"^too large: 8000x8000 pixels > limit {DEFAULT_MAX_PIXELS}"):
        decode_image(patch_png_size(png, 8000, 8000))  # only our limit
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ImageDecodeError, match=r"too large: 64x48 pixels > limit 1000 \[shard-a/key1\]"):
        decode_image(encode(Image.fromarray(photo()), "PNG"), max_pixels=1000, source="shard-a/key1")


def test_pillow_warnings_never_become_exceptions() -> None:
    png = encode(Image.fromarray(photo(8, 8)[..., 0]), "PNG")  # grey: 1 byte per pixel if allocated
    exif = Image.Exif()
    exif[0x0112] = 3
    jpeg = encode(Image.fromarray(photo()), "JPEG", exif=exif.tobytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # like `pytest -W error` in a caller
        # 100 MP: Pillow warns (DecompressionBombWarning) but our limit allows it; then pixels are missing.
        with pytest.raises(ImageDecodeError, match="^truncated image|^corrupt image"):
            decode_image(patch_png_size(png, 10000, 10000), max_pixels=100_000_000)
        assert decode_image(jpeg).shape == (48, 64, 3)
