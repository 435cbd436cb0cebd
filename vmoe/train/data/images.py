"""Decoding one image file, with an error that names the file (shared by the folder and timm DataModules)."""
from __future__ import annotations

from typing import IO

from PIL import Image

__all__ = ["ImageReadError", "decode_image", "load_rgb"]


class ImageReadError(OSError):
    """An image file that PIL cannot decode; the message names the file."""


def decode_image(source: str | IO[bytes], mode: str = "RGB", name: str | None = None) -> Image.Image:
    """Decode ``source`` (a path or an open file) fully into a PIL image of ``mode``, or raise ImageReadError
    naming ``name`` (default: the path)."""
    try:
        with Image.open(source) as img:
            return img.convert(mode)  # convert() forces the full decode inside the try
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {name or source}: {type(err).__name__}: {err}") from err


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image, or raise ImageReadError naming the file."""
    return decode_image(path, "RGB")
