"""Checks that a picture file is what people will look at: a valid image of the expected size, not blank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vitlab.figures import DPI


def inches_to_pixels(inches: tuple[float, float], dpi: int = DPI) -> tuple[int, int]:
    return round(inches[0] * dpi), round(inches[1] * dpi)


def assert_picture(path: Path, size: tuple[int, int], kind: str = "PNG") -> np.ndarray:
    """``path`` is a complete, decodable ``kind`` image of ``size`` (width, height) with visible content;
    returns its pixels (the first frame's for a GIF)."""
    with Image.open(path) as image:
        image.verify()  # checksums and structure: a truncated or corrupt file fails here
    with Image.open(path) as image:
        assert image.format == kind, f"{path.name}: {image.format}, expected {kind}"
        assert image.size == size, f"{path.name}: {image.size}, expected {size}"
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10, f"{path.name} looks blank"
    return pixels
