"""Training data: the shipped emoji16 set, the course's sprites, an .npz, or an image folder.

Everything is loaded into memory as uint8 NHWC RGB plus int64 labels (`ImageData`); turning it
into float tensors in [-1, 1] is the trainer's job. Only numpy and pillow are needed here, so
data can be checked without torch. Every problem a user's data can have raises `DataError`
with a one-line message naming the file and what is wrong.

    load_data("emoji16")                                  # train/data/emoji16.npz
    load_data("data/sprites_1788_16x16.npy")              # + sprite_labels_nc_1788_16x16.npy
    load_data("my_set.npz")                               # images, labels, class_names
    load_data("my_folder/")                               # my_folder/<class>/<image>.png
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

EMOJI16_PATH = Path(__file__).resolve().parent / "data" / "emoji16.npz"
EMOJI16_CLASSES = (
    "smileys", "people", "animals", "food", "travel", "activities", "objects", "symbols", "flags",
)
COURSE_CLASSES = ("hero", "non-hero", "food", "spell", "side-facing")
COURSE_IMAGES_PREFIX = "sprites_"
COURSE_LABELS_PREFIX = "sprite_labels_nc_"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
CHANNELS = 3


class DataError(ValueError):
    """Bad data given by the user; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageData:
    """A labelled image set held in memory."""

    images: np.ndarray              # uint8 (N, H, W, C), C = 3 (RGB)
    labels: np.ndarray              # int64 (N,), 0..K-1
    class_names: tuple[str, ...]    # K names; label k is class_names[k]

    @property
    def num_classes(self) -> int:
        """K, the number of classes (some may have no images)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)


# ----------------------------------------------------------------------------- validation

def _check_image_size(image_size: int) -> None:
    # The U-Net pools twice by 2, so the side must divide by 4.
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise DataError(f"image_size must be an integer, got {image_size!r}")
    if image_size <= 0 or image_size % 4:
        raise DataError(f"image_size must be a positive multiple of 4, got {image_size}")


def _check_images(images: np.ndarray, source: Path) -> None:
    if images.dtype != np.uint8:
        raise DataError(f"{source}: images must be uint8, got {images.dtype}")
    if images.ndim != 4:
        raise DataError(f"{source}: images must have shape (N, H, W, 3), got {images.shape}")
    if images.shape[-1] != CHANNELS:
        raise DataError(f"{source}: images must have 3 (RGB) channels last, got shape {images.shape}")
    if 0 in images.shape:
        raise DataError(f"{source}: no images (shape {images.shape})")


def _check_labels(labels: np.ndarray, num_images: int, num_classes: int, source: Path) -> np.ndarray:
    """Validate integer (N,) or one-hot (N, K) labels; return int64 (N,)."""
    if labels.ndim == 2:
        labels = _from_one_hot(labels, num_classes, source)
    elif labels.ndim != 1:
        raise DataError(f"{source}: labels must have shape (N,) or one-hot (N, K), got {labels.shape}")
    elif labels.dtype.kind not in "iu":
        raise DataError(f"{source}: labels must be integers, got {labels.dtype}")
    if len(labels) != num_images:
        raise DataError(f"{source}: {len(labels)} labels for {num_images} images")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise DataError(f"{source}: label {labels[bad][0]} at index {np.flatnonzero(bad)[0]} "
                        f"is out of range 0..{num_classes - 1}")
    return labels.astype(np.int64)


def _from_one_hot(one_hot: np.ndarray, num_classes: int, source: Path) -> np.ndarray:
    if one_hot.shape[1] != num_classes:
        raise DataError(f"{source}: one-hot labels have {one_hot.shape[1]} columns, "
                        f"expected {num_classes} (one per class)")
    if one_hot.dtype.kind not in "biuf":
        raise DataError(f"{source}: labels must be numeric, got {one_hot.dtype}")
    # Exactly one 1 per row: a mixed or empty row has no single class to learn.
    rows_ok = np.all((one_hot == 0) | (one_hot == 1), axis=1) & (one_hot.sum(axis=1) == 1)
    if not rows_ok.all():
        row = np.flatnonzero(~rows_ok)[0]
        raise DataError(f"{source}: labels are not one-hot: row {row} is {one_hot[row].tolist()}")
    return one_hot.argmax(axis=1)


def _check_class_names(names: np.ndarray, source: Path) -> tuple[str, ...]:
    if names.dtype.kind != "U" or names.ndim != 1:
        raise DataError(f"{source}: class_names must be a 1-D unicode string array, "
                        f"got {names.dtype} with shape {names.shape}")
    result = tuple(str(n) for n in names)
    if not result or "" in result or len(set(result)) != len(result):
        raise DataError(f"{source}: class_names must be non-empty and unique, got {list(result)}")
    return result


# ----------------------------------------------------------------------------- images

def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels become white rather than their hidden colour."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _resize(images: np.ndarray, image_size: int) -> np.ndarray:
    """Lanczos-resize (N, H, W, 3) uint8 to (N, image_size, image_size, 3), if not already."""
    if images.shape[1:3] == (image_size, image_size):
        return images
    size = (image_size, image_size)
    return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.LANCZOS)) for im in images])


def _read_image(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e
    return np.asarray(rgb.resize((image_size, image_size), Image.LANCZOS), dtype=np.uint8)


# ----------------------------------------------------------------------------- arrays on disk

def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        array = np.load(path, allow_pickle=False)  # no pickle: data must not run code
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read .npy file ({e})") from e
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: not a .npy array (an .npz archive?)")
    return array


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)  # no pickle: data must not run code
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read .npz file ({e})") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive (a single .npy array?)")
    with loaded as npz:
        try:
            return {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"{path}: cannot read .npz file ({e})") from e


def _load_npz(path: Path, image_size: int) -> ImageData:
    arrays = _read_npz(path)
    missing = {"images", "labels", "class_names"} - set(arrays)
    if missing:
        raise DataError(f"{path}: missing arrays {sorted(missing)}; "
                        "an .npz needs images, labels and class_names")
    images, labels, names = arrays["images"], arrays["labels"], arrays["class_names"]
    _check_images(images, path)
    class_names = _check_class_names(names, path)
    labels = _check_labels(labels, len(images), len(class_names), path)
    return ImageData(_resize(images, image_size), labels, class_names)


def course_labels_path(images_path: Path) -> Path:
    """The course's labels file beside its images: sprites_X.npy -> sprite_labels_nc_X.npy."""
    name = images_path.name
    if not name.startswith(COURSE_IMAGES_PREFIX):
        raise DataError(f"{images_path}: cannot find its labels file (the name does not start "
                        f"with {COURSE_IMAGES_PREFIX!r}); pass the labels file explicitly")
    return images_path.with_name(COURSE_LABELS_PREFIX + name[len(COURSE_IMAGES_PREFIX):])


def _load_course(path: Path, image_size: int, labels_path: Path | None) -> ImageData:
    images = _load_npy(path)
    _check_images(images, path)
    labels_path = labels_path or course_labels_path(path)
    if not labels_path.is_file():
        raise DataError(f"{labels_path}: labels file not found (for images {path.name})")
    labels = _check_labels(_load_npy(labels_path), len(images), len(COURSE_CLASSES), labels_path)
    return ImageData(_resize(images, image_size), labels, COURSE_CLASSES)


# ----------------------------------------------------------------------------- image folder

def _class_dirs(root: Path) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints) are not classes.
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root}: no class sub-folders; expected {root}/<class>/<image>.png")
    return dirs


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(p for p in class_dir.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{class_dir}: class folder has no images "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def _load_folder(root: Path, image_size: int) -> ImageData:
    images, labels = [], []
    class_dirs = _class_dirs(root)
    for label, class_dir in enumerate(class_dirs):
        for file in _image_files(class_dir):
            images.append(_read_image(file, image_size))
            labels.append(label)
    class_names = tuple(d.name for d in class_dirs)
    return ImageData(np.stack(images), np.asarray(labels, dtype=np.int64), class_names)


# ----------------------------------------------------------------------------- entry points

def _load_emoji16(image_size: int) -> ImageData:
    if not EMOJI16_PATH.is_file():
        raise DataError(f"{EMOJI16_PATH}: the emoji16 data set is missing; "
                        "rebuild it with `python -m mdx.train.build_emoji16`")
    data = _load_npz(EMOJI16_PATH, image_size)
    if data.class_names != EMOJI16_CLASSES:
        raise DataError(f"{EMOJI16_PATH}: class names {list(data.class_names)} are not "
                        f"{list(EMOJI16_CLASSES)}; rebuild it with `python -m mdx.train.build_emoji16`")
    return data


def load_data(spec: str = "emoji16", image_size: int = 16, labels: str | None = None) -> ImageData:
    """Load a labelled image set as uint8 (N, image_size, image_size, 3) plus int64 labels.

    spec: "emoji16" (the shipped set); an .npz with images, labels (ints or one-hot) and
    class_names; the course's sprites .npy (labels from `labels`, or the file beside it named
    sprite_labels_nc_*.npy); or a folder with one sub-folder of images per class.
    Images of another size are resized with Lanczos. Raises DataError on any bad input.
    """
    _check_image_size(image_size)
    if spec == "emoji16":
        _no_labels_option(labels, spec)
        return _load_emoji16(image_size)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected 'emoji16', an .npz, "
                        "a sprites .npy or an image folder)")
    if path.is_dir():
        _no_labels_option(labels, spec)
        return _load_folder(path, image_size)
    if path.suffix.lower() == ".npz":
        _no_labels_option(labels, spec)
        return _load_npz(path, image_size)
    if path.suffix.lower() == ".npy":
        return _load_course(path, image_size, Path(labels) if labels else None)
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; "
                    "expected an .npz, a sprites .npy or an image folder")


def _no_labels_option(labels: str | None, spec: str) -> None:
    # A separate labels file only makes sense for the course's .npy pair; say so, don't ignore it.
    if labels is not None:
        raise DataError(f"a labels file ({labels}) is only used with a sprites .npy, not {spec}")


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) at random into sorted (train_idx, holdout_idx), int64, reproducibly.

    The holdout gets round(n * holdout_fraction) items, at least 1 when the fraction is
    positive and never all n. Same (n, holdout_fraction, seed), same split, on any machine.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"n must be a positive integer, got {n!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
    n_holdout = int(round(n * holdout_fraction))
    if holdout_fraction > 0:
        n_holdout = min(max(n_holdout, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_holdout:]).astype(np.int64), np.sort(order[:n_holdout]).astype(np.int64)
