"""Reading images, listing a folder's, and writing PNGs with their settings in text chunks,
atomically."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "atomic_path", "image_files", "iter_image_files", "load_image",
           "read_png_text", "save_png", "temp_path", "to_pil", "to_rgb", "to_tensor"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image as RGB; with ``size`` (width, height), scale and centre-crop to fill it.

    Raises:
        FileNotFoundError: no such file. ValueError: not an image Pillow can read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            image = to_rgb(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    if size is not None:
        image = ImageOps.fit(image, tuple(size), Image.Resampling.LANCZOS)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB, as it looks: 16-bit greyscale scaled down (Pillow's own
    conversion clips it to white), transparency composited onto white (not onto whatever colour
    the transparent pixels happen to hold)."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        # 16-bit greyscale; its transparency value (rare) is dropped rather than misapplied
        return image.convert("I").point(lambda v: v / 256).convert("L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> ``(1, 3, H, W)`` float in [0, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1)[None].float() / 255


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` in [0, 1] -> PIL RGB."""
    data = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu()
    return Image.fromarray(data.numpy())


def temp_path(path: str | Path) -> Path:
    """A hidden temporary name beside ``path``, keeping its suffix for writers that pick a format
    from it (ffmpeg does)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that is renamed to it if the block succeeds."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(image: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Write a PNG with ``text`` as iTXt chunks, atomically (never a half-written file)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG."""
    with Image.open(path) as im:
        im.load()
        return {str(k): str(v) for k, v in im.text.items()}  # plain str, not PIL iTXt objects


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder``, recursively and sorted (see :func:`iter_image_files`).

    Raises:
        FileNotFoundError, NotADirectoryError: no such folder. ValueError: no images in it.
    """
    files = list(iter_image_files(folder))
    if not files:
        raise ValueError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def iter_image_files(folder: str | Path) -> Iterator[Path]:
    """Image files under ``folder``, recursively, in sorted order (``sorted()`` of the paths), as
    a stream: one folder's listing at a time in memory.

    Hidden files and folders are left out, and symlinked folders are not followed (no loops);
    a folder that cannot be read is skipped with a warning.

    Raises:
        FileNotFoundError, NotADirectoryError: no such folder (when the stream starts).
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    return _walk(folder)


def _walk(folder: Path) -> Iterator[Path]:
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as e:
        log.warning("skipped folder %s: %s", folder, e.strerror)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(folder / entry.name)
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
            yield folder / entry.name
