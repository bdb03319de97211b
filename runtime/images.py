"""From float samples to files: uint8 conversion, grids, PNG / NPZ / folder output, GIFs.

Samples are float32 (N, C, H, W) in [-1, 1] inside the runtime and uint8 (N, H, W, C) on
disk (docs/contract.md). Every writer writes to a temporary name next to the target and renames it
into place (`os.replace`), so a failure never leaves a half-written file behind.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from einops import rearrange, repeat
from PIL import Image

from mdx.runtime.fileio import OutputError, WriteError, atomic_dir, atomic_write, write_error  # noqa: F401 -- re-exported

OUTPUT_KINDS = ("png", "npz", "folder")


# --- arrays ---------------------------------------------------------------------------


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8, rounding to nearest."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    x = (x + 1.0) * 127.5  # [-1, 1] -> [0, 255]
    return rearrange(np.rint(x).astype(np.uint8), "n c h w -> n h w c")


def to_float(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1], contiguous (u / 127.5 - 1)."""
    x = np.ascontiguousarray(rearrange(np.asarray(images), "n h w c -> n c h w"), dtype=np.float32)
    x /= np.float32(127.5)
    x -= np.float32(1.0)
    return x


def grid_columns(n: int, num_classes: int | None = None) -> int:
    """K columns when the batch cycles through K classes (one class per column), else about square."""
    if num_classes and n >= num_classes and n % num_classes == 0:
        return num_classes
    return max(1, math.ceil(math.sqrt(n)))


def make_grid(images: np.ndarray, columns: int, scale: int = 1, pad: int = 1,
              background: int = 255) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, ...) image, upscaled by `scale` (nearest)."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    tiles = np.full((rows * columns, h, w, c), background, dtype=np.uint8)
    tiles[:n] = images
    tiles = np.pad(tiles, ((0, 0), (0, pad), (0, pad), (0, 0)), constant_values=background)
    grid = rearrange(tiles, "(r k) h w c -> (r h) (k w) c", r=rows, k=columns)
    grid = np.pad(grid, ((pad, 0), (pad, 0), (0, 0)), constant_values=background)
    if scale > 1:
        grid = repeat(grid, "h w c -> (h s1) (w s2) c", s1=scale, s2=scale)  # nearest neighbour
    return grid


def _pil(image: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> a PIL image (C = 1 as greyscale, 3 as RGB, 4 as RGBA)."""
    if image.shape[-1] == 1:
        return Image.fromarray(image[..., 0], mode="L")
    return Image.fromarray(image)


# --- output paths ---------------------------------------------------------------------


def output_kind(path: str | os.PathLike) -> str:
    """'png', 'npz' or 'folder' (an existing directory, a trailing slash, or no suffix)."""
    text = os.fspath(path)
    p = Path(text)
    if p.is_dir() or text.endswith(("/", os.sep)) or p.suffix == "":
        return "folder"
    suffix = p.suffix.lower()
    if suffix in (".png", ".npz"):
        return suffix[1:]
    raise OutputError(f"cannot tell what to write to {text}: use a .png file (a grid), an .npz file "
                      "or a folder (one PNG per image)")


def check_writable(path: str | os.PathLike, kind: str) -> Path:
    """Fail early, before any sampling, when `path` cannot be written."""
    p = Path(path)
    if kind == "folder":
        if p.exists() and not p.is_dir():
            raise OutputError(f"cannot write images into {p}: it exists and is not a folder")
        parent = p if p.exists() else p.parent
    else:
        if p.is_dir():
            raise OutputError(f"cannot write {p}: it is a folder")
        parent = p.parent
    parent = parent if str(parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {p}: folder {parent} is not writable")
    return p


# --- writers --------------------------------------------------------------------------


def save_grid_png(samples: np.ndarray, path: str | os.PathLike, columns: int, scale: int = 4) -> Path:
    target = Path(path)
    grid = make_grid(to_uint8(samples), columns, scale)
    with atomic_write(target, ".png") as tmp:
        _pil(grid).save(tmp, format="PNG")
    return target


def save_npz(samples: np.ndarray, labels: np.ndarray, path: str | os.PathLike) -> Path:
    """`images` uint8 (N, H, W, C), `labels` int64 (N,) (-1: not one class), `samples` float32 (N, C, H, W)."""
    target = Path(path)
    with atomic_write(target, ".npz") as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, images=to_uint8(samples), labels=np.asarray(labels, dtype=np.int64),
                     samples=np.asarray(samples, dtype=np.float32))
    return target


def image_names(labels: np.ndarray, class_names: Sequence[str], unlabelled: str = "mix") -> list[str]:
    """`0000_apple.png`, `0001_ball.png` ...; a -1 label (a mix, unconditional) is named `unlabelled`."""
    width = max(4, len(str(len(labels) - 1)))
    names = []
    for i, label in enumerate(labels):
        tag = class_names[label] if label >= 0 else unlabelled
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in tag)
        names.append(f"{i:0{width}d}_{safe}.png")
    return names


def _write_pngs(folder: Path, images: np.ndarray, names: Sequence[str], scale: int) -> None:
    for image, name in zip(images, names):
        if scale > 1:
            image = repeat(image, "h w c -> (h s1) (w s2) c", s1=scale, s2=scale)
        _pil(image).save(folder / name, format="PNG")


def save_folder(samples: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                scale: int = 1, unlabelled: str = "mix") -> list[Path]:
    """One PNG per image in folder `path`: written to a temporary folder beside it first, so a
    failure leaves no partial set behind. A new folder appears whole; an existing one keeps its
    other files and gets the new ones moved in."""
    target = Path(path)
    images = to_uint8(samples)
    names = image_names(labels, class_names, unlabelled)
    if not target.exists():
        with atomic_dir(target) as staging:
            _write_pngs(staging, images, names, scale)
        return [target / name for name in names]
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent if str(target.parent) else "."))
        _write_pngs(staging, images, names, scale)
        for name in names:
            os.replace(staging / name, target / name)  # a rename in one file system: needs no space
    except OSError as e:
        raise write_error(target, e) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return [target / name for name in names]


def frame_indices(count: int, max_frames: int) -> list[int]:
    """At most `max_frames` indices spread evenly over range(count), always keeping the last."""
    if count <= max_frames:
        return list(range(count))
    return sorted({round(i * (count - 1) / (max_frames - 1)) for i in range(max_frames)})


def save_gif(frames: Sequence[np.ndarray], final: np.ndarray, path: str | os.PathLike, columns: int,
             scale: int = 4, max_frames: int = 60, frame_ms: int = 80, hold_ms: int = 1500) -> Path:
    """Animate the denoising: one grid per recorded x_0 prediction, then the final samples held."""
    target = Path(path)
    chosen = [frames[i] for i in frame_indices(len(frames), max_frames)]
    grids = [_pil(make_grid(to_uint8(f), columns, scale)).convert("RGB") for f in [*chosen, final]]
    durations = [frame_ms] * (len(grids) - 1) + [hold_ms]
    with atomic_write(target, ".gif") as tmp:
        grids[0].save(tmp, format="GIF", save_all=True, append_images=grids[1:], duration=durations,
                      loop=0, optimize=False)
    return target
