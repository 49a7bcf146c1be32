"""Decoding image files the way every step sees them: RGB, upright, 8 bits a channel."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

# A declared size above this many pixels is treated as a decompression bomb.
MAX_PIXELS = 89_478_485  # Pillow's own default limit


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency over white, 16-bit scaled, CMYK converted."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale the integer range into 0..255 instead of clipping.
        scale = 1 / 256 if img.mode.startswith("I;16") else 1 / 65536
        img = img.point(lambda v: v * scale).convert("L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def check(data: bytes) -> tuple[int, int]:
    """Decode an encoded image (nothing else) and return its size, or raise ValueError saying why
    it is unusable. What the data step runs on every file. JPEGs are decoded at 1/8 scale: every
    byte of their compressed data is still read and decoded (a truncated or corrupt scan fails
    just the same), without the cost of the full-size pixels."""
    return _open(data, draft=True)[1]


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Fully decode an encoded image into an upright RGB image, or raise ValueError saying why."""
    return to_rgb(ImageOps.exif_transpose(_open(data, max_pixels=max_pixels)[0]))


def declared_size(data: bytes) -> tuple[int, int]:
    """The size an encoded image's header declares, read without decoding its pixels."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller judges the size
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError as err:
        raise ValueError(f"decompression bomb: {err}") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError):
        raise ValueError("not a recognised image format") from None


def _open(data: bytes, draft: bool = False, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """The decoded image and its size as stored (before any draft scaling)."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError(f"declared size {width}x{height} exceeds {max_pixels} pixels (decompression bomb)")
            if getattr(img, "n_frames", 1) > 1:
                raise ValueError(f"animated image with {img.n_frames} frames")
            if draft and img.format == "JPEG":
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ValueError(f"decompression bomb: {err}") from None
        except Image.UnidentifiedImageError:
            raise ValueError("not a recognised image format") from None
        except (OSError, SyntaxError) as err:
            raise ValueError(f"truncated or corrupt image data ({err})") from None
    return img, (width, height)


def load_rgb(path) -> Image.Image:
    with open(path, "rb") as f:
        return decode(f.read())
