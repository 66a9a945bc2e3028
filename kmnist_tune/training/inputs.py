"""What `predict` reads: picture files, folders of them, and `.npz`/idx files of 28x28 images."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Inputs:
    names: list[str]  # a file, or `file[i]` for the i-th image of an array file
    images: np.ndarray  # uint8 (N, 28, 28), white on black


# A picture is one character; the caps still take a whole A4 page scanned at 600 dpi (4961 x 7016 =
# 34.8 M pixels). Both are read from the header, before any pixel is decoded: a 118-byte PNG can say
# 40000 x 1, which padded to a square would be 1.6 GB. The side caps that square (8192^2 = 64 MB).
MAX_SIDE = 8192
MAX_PIXELS = 36_000_000
CAPS = f"predict takes pictures up to {MAX_SIDE} pixels a side and {MAX_PIXELS // 1_000_000} M pixels: crop or scale it down"


def _check_size(path: Path, w: int, h: int) -> None:
    if max(w, h) > MAX_SIDE or w * h > MAX_PIXELS:
        raise UserError(f"{path}: a {w}x{h} picture; {CAPS}")


def image_to_28(path: Path) -> np.ndarray:
    """A picture file as a KMNIST image: grayscale, ink light on a dark ground (a dark-on-light
    scan is inverted, judged by its border), padded to a square and resized to 28x28."""
    from PIL import Image, UnidentifiedImageError

    try:
        # Pillow only warns about a decompression bomb below twice its own limit: make that a refusal too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(path, *im.size)
                im.load()
                _check_size(path, *im.size)  # a format may settle its size on load; checked before the square below
                gray = np.asarray(im.convert("L"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        why = one_line(e, 120)
        raise UserError(f"{path}: refused as a decompression bomb ({why}); {CAPS}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot be read as an image ({one_line(e, 120)})") from None
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 127:
        gray = 255 - gray
    h, w = gray.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.uint8)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = gray
    if side == 28:
        return square
    resized = Image.fromarray(square).resize((28, 28), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def read_inputs(paths: list[Path], max_images: int | None = None) -> Inputs:
    """Picture files, folders of them (in name order), and `.npz`/idx files of 28x28 images (at most
    `max_images` from one file: data.DEFAULT_MAX_IMAGES when None)."""
    from .data import DEFAULT_MAX_IMAGES, read_array_file

    limit = max_images or DEFAULT_MAX_IMAGES

    names: list[str] = []
    arrays: list[np.ndarray] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"{path}: no picture files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise UserError(f"{path}: no such file or folder")
        for f in files:
            if f.suffix.lower() in IMAGE_SUFFIXES:
                names.append(str(f))
                arrays.append(image_to_28(f)[None])
            else:
                images = read_array_file(f, images=True, limit=limit)
                names += [f"{f}[{i}]" for i in range(len(images))]
                arrays.append(images)
    return Inputs(names, np.concatenate(arrays) if arrays else np.zeros((0, 28, 28), np.uint8))
