"""Rebuild the shipped `emoji16` data set from the emoji-datasource npm packages.

    python -m mdx.train.build_emoji16 [--twitter TGZ] [--google TGZ] [-o OUT.npz]

Each npm tarball (`emoji-datasource-<vendor>@16.0.0`) holds `package/emoji.json`, a list of
emoji records (category, image file name, `has_img_<vendor>`, `skin_variations`), and the
rendered images under `package/img/<vendor>/64/`. We take every 64 px image of both vendors,
skin-tone variants included, drop the 'Component' category (bare skin-tone swatches and hair
parts, not pictures of anything), composite each on white, shrink it to 16x16 with Lanczos and
store uint8 RGB with one of 9 category labels. PNGs are read straight out of the tarball.

Without a tarball argument the script runs `npm pack` into a temporary folder to fetch it.
Licences of the graphics are in the top-level NOTICE file.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from mdx.runtime.fileio import atomic_write

PACKAGE_VERSION = "16.0.0"
VENDORS = ("twitter", "google")
IMAGE_SIZE = 16
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "emoji16.npz"

# emoji-data's category names -> our short class names, in the label order we ship.
CATEGORY_TO_CLASS = {
    "Smileys & Emotion": "smileys",
    "People & Body": "people",
    "Animals & Nature": "animals",
    "Food & Drink": "food",
    "Travel & Places": "travel",
    "Activities": "activities",
    "Objects": "objects",
    "Symbols": "symbols",
    "Flags": "flags",
}
CLASS_NAMES = tuple(CATEGORY_TO_CLASS.values())
SKIPPED_CATEGORIES = frozenset({"Component"})


class BuildError(RuntimeError):
    """The npm package is missing or not shaped as expected."""


# ----------------------------------------------------------------------------- conversion

def category_label(category: str) -> int | None:
    """Label index of an emoji-data category; None for a skipped one; raise on an unknown one."""
    if category in SKIPPED_CATEGORIES:
        return None
    if category not in CATEGORY_TO_CLASS:
        # A new upstream category would silently shift the label set: stop instead.
        raise BuildError(f"unknown emoji category {category!r}; known: {sorted(CATEGORY_TO_CLASS)}")
    return CLASS_NAMES.index(CATEGORY_TO_CLASS[category])


def to_rgb16(png: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode a PNG, composite it on white, Lanczos-resize to (size, size); uint8 (size, size, 3)."""
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    # Composite before resizing so transparent pixels' hidden colours can't bleed into edges.
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.LANCZOS), dtype=np.uint8)


def image_labels(records: list[dict], vendor: str) -> dict[str, int]:
    """Map each image file name the vendor draws (skin tones included) to its label."""
    has_img = f"has_img_{vendor}"
    labels: dict[str, int] = {}
    for record in records:
        label = category_label(record["category"])
        if label is None:
            continue
        # Skin-tone variants inherit the category of their base emoji.
        for entry in [record, *(record.get("skin_variations") or {}).values()]:
            if entry.get(has_img):
                labels[entry["image"]] = label
    return labels


def read_vendor(tgz: Path, vendor: str) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yield (image name, 16x16 RGB image, label) for every 64 px image of a vendor, by name."""
    records, pngs = read_tarball(tgz, vendor)
    labels = image_labels(records, vendor)
    missing = sorted(set(labels) - set(pngs))
    if missing:
        raise BuildError(f"{tgz}: emoji.json lists {len(missing)} images not in img/{vendor}/64/, "
                         f"e.g. {missing[0]}")
    for name in sorted(labels):
        yield name, to_rgb16(pngs[name]), labels[name]


def read_tarball(tgz: Path, vendor: str) -> tuple[list[dict], dict[str, bytes]]:
    """Read emoji.json and the raw 64 px PNGs of a vendor in one pass over the tarball."""
    # One sequential pass: random access into a .tgz re-decompresses from the start each time.
    prefix = f"package/img/{vendor}/64/"
    records, pngs = None, {}
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            if member.name == "package/emoji.json":
                records = json.load(tar.extractfile(member))
            elif member.name.startswith(prefix) and member.name.endswith(".png"):
                pngs[member.name[len(prefix):]] = tar.extractfile(member).read()
    if records is None:
        raise BuildError(f"{tgz}: no package/emoji.json; is this an emoji-datasource tarball?")
    return records, pngs


# ----------------------------------------------------------------------------- data set

def build(tarballs: dict[str, Path]) -> dict[str, np.ndarray]:
    """Build the npz arrays from {vendor: tarball}, in vendor order then image name order."""
    images, labels, sources = [], [], []
    for vendor in VENDORS:
        for name, image, label in read_vendor(tarballs[vendor], vendor):
            images.append(image)
            labels.append(label)
            sources.append(f"{vendor}/{name}")
    versions = {f"emoji-datasource-{v}": PACKAGE_VERSION for v in VENDORS}
    return {
        "images": np.stack(images),                               # (N, 16, 16, 3) uint8
        "labels": np.asarray(labels, dtype=np.int64),             # (N,)
        "class_names": np.asarray(CLASS_NAMES, dtype=np.str_),    # unicode, no pickle needed
        "source": np.asarray(sources, dtype=np.str_),             # "vendor/image.png" per image
        "packages": np.asarray(json.dumps(versions), dtype=np.str_),
    }


def save_atomic(arrays: dict[str, np.ndarray], out: Path) -> None:
    """Write a compressed npz atomically (fileio.atomic_write), so readers never see half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, suffix=".tmp.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def npm_pack(vendor: str, dest: Path) -> Path:
    """Download emoji-datasource-<vendor>@PACKAGE_VERSION with `npm pack` into dest."""
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            "npm is not installed; install Node.js/npm or pass the tarballs with "
            "--twitter/--google (from `npm pack emoji-datasource-<vendor>@16.0.0`)"
        )
    spec = f"emoji-datasource-{vendor}@{PACKAGE_VERSION}"
    subprocess.run([npm, "pack", spec, "--pack-destination", str(dest)], check=True)
    return dest / f"emoji-datasource-{vendor}-{PACKAGE_VERSION}.tgz"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--twitter", type=Path, help="emoji-datasource-twitter-16.0.0.tgz")
    parser.add_argument("--google", type=Path, help="emoji-datasource-google-16.0.0.tgz")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help="output .npz")
    args = parser.parse_args(argv)
    try:
        for vendor in VENDORS:  # check given paths before spending time on npm
            path = getattr(args, vendor)
            if path is not None and not path.is_file():
                raise BuildError(f"{path}: no such {vendor} tarball")
        with tempfile.TemporaryDirectory() as tmp:
            tarballs = {v: getattr(args, v) or npm_pack(v, Path(tmp)) for v in VENDORS}
            arrays = build(tarballs)
    except (BuildError, subprocess.CalledProcessError, tarfile.TarError) as e:
        print(f"build_emoji16: error: {e}", file=sys.stderr)
        return 2
    save_atomic(arrays, args.out)
    counts = np.bincount(arrays["labels"], minlength=len(CLASS_NAMES))
    print(f"wrote {args.out}: {len(arrays['labels'])} images, {args.out.stat().st_size} bytes")
    for name, count in zip(CLASS_NAMES, counts):
        print(f"  {name:<11} {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
