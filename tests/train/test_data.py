"""Tests for mdx.train.data (loading and validating data sets) and mdx.train.build_emoji16."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdx.train import build_emoji16 as be
from mdx.train import data as md
from mdx.train.data import COURSE_CLASSES, EMOJI16_CLASSES, DataError, load_data, split_indices


def raises_data_error(*fragments: str):
    """Expect a one-line DataError whose message holds every fragment (literally)."""
    pattern = "".join(f"(?=.*{re.escape(f)})" for f in fragments)
    return pytest.raises(DataError, match=pattern)


def one_line(excinfo: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(excinfo.value)


def rand_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def one_hot(labels: list[int], k: int) -> np.ndarray:
    return np.eye(k)[labels]  # float64, as the course's labels file is


def lanczos(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))


# ----------------------------------------------------------------------------- the shipped set

def test_emoji16_shipped_file_is_well_formed():
    data = load_data("emoji16")
    n = len(data)
    assert 7000 <= n <= 8000  # 7,562 when built from the 16.0.0 packages
    assert data.images.shape == (n, 16, 16, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (n,) and data.labels.dtype == np.int64
    assert data.class_names == (
        "smileys", "people", "animals", "food", "travel", "activities", "objects", "symbols", "flags")
    assert data.labels.min() >= 0 and data.labels.max() < 9
    assert (np.bincount(data.labels, minlength=9) > 0).all()  # every class present
    # Composited on white: the corners of most emoji are pure white, none transparent-black.
    assert (data.images[:, 0, 0] == 255).all(axis=1).mean() > 0.5


def test_emoji16_is_the_default_and_matches_the_build_script():
    assert load_data().labels.shape == load_data("emoji16").labels.shape
    assert EMOJI16_CLASSES == be.CLASS_NAMES
    with np.load(md.EMOJI16_PATH, allow_pickle=False) as npz:
        sources = npz["source"]
    vendors = {s.split("/")[0] for s in sources}
    assert vendors == {"twitter", "google"}
    assert list(sources) == sorted(sources, key=lambda s: (be.VENDORS.index(s.split("/")[0]), s))


def test_emoji16_resized_to_another_image_size():
    assert load_data("emoji16", image_size=8).images.shape[1:] == (8, 8, 3)


def test_emoji16_missing_file_says_how_to_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(md, "EMOJI16_PATH", tmp_path / "emoji16.npz")
    with raises_data_error("emoji16.npz", "build_emoji16") as e:
        load_data("emoji16")
    one_line(e)


@pytest.mark.parametrize("size", [0, -4, 6, 18, 16.0, True, "16"])
def test_image_size_must_be_a_positive_multiple_of_4(size):
    with raises_data_error("image_size") as e:
        load_data("emoji16", image_size=size)
    one_line(e)


# ----------------------------------------------------------------------------- course format

@pytest.fixture
def course(tmp_path: Path) -> tuple[Path, np.ndarray, list[int]]:
    images, labels = rand_images(7), [0, 1, 2, 3, 4, 4, 1]
    path = tmp_path / "sprites_7_16x16.npy"
    np.save(path, images)
    np.save(tmp_path / "sprite_labels_nc_7_16x16.npy", one_hot(labels, 5))
    return path, images, labels


def test_course_pair_found_by_name(course):
    path, images, labels = course
    data = load_data(str(path))
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.labels.dtype == np.int64
    assert data.class_names == COURSE_CLASSES == ("hero", "non-hero", "food", "spell", "side-facing")


def test_course_labels_given_explicitly(tmp_path):
    images = rand_images(3)
    np.save(tmp_path / "pics.npy", images)
    np.save(tmp_path / "my_labels.npy", one_hot([2, 0, 1], 5))
    data = load_data(str(tmp_path / "pics.npy"), labels=str(tmp_path / "my_labels.npy"))
    np.testing.assert_array_equal(data.labels, [2, 0, 1])


def test_course_integer_labels_accepted(tmp_path):
    np.save(tmp_path / "sprites_x.npy", rand_images(3))
    np.save(tmp_path / "sprite_labels_nc_x.npy", np.array([4, 0, 2], dtype=np.uint8))
    np.testing.assert_array_equal(load_data(str(tmp_path / "sprites_x.npy")).labels, [4, 0, 2])


def test_course_images_resized_with_lanczos(tmp_path):
    images = rand_images(2, size=8)
    np.save(tmp_path / "sprites_s.npy", images)
    np.save(tmp_path / "sprite_labels_nc_s.npy", one_hot([0, 1], 5))
    data = load_data(str(tmp_path / "sprites_s.npy"), image_size=16)
    assert data.images.shape == (2, 16, 16, 3) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images[1], lanczos(images[1], 16))


def test_course_missing_labels_file_names_it(course):
    path, _, _ = course
    (path.parent / "sprite_labels_nc_7_16x16.npy").unlink()
    with raises_data_error("sprite_labels_nc_7_16x16.npy", "not found") as e:
        load_data(str(path))
    one_line(e)


def test_course_labels_cannot_be_guessed_without_the_prefix(tmp_path):
    np.save(tmp_path / "pics.npy", rand_images(2))
    with raises_data_error("pics.npy", "sprites_"):
        load_data(str(tmp_path / "pics.npy"))


def test_course_labels_path_follows_the_course_naming():
    assert md.course_labels_path(Path("d/sprites_1788_16x16.npy")) == Path(
        "d/sprite_labels_nc_1788_16x16.npy")


def save_pair(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    np.save(tmp_path / "sprites_t.npy", images)
    np.save(tmp_path / "sprite_labels_nc_t.npy", labels)
    return str(tmp_path / "sprites_t.npy")


@pytest.mark.parametrize("images, fragment", [
    (rand_images(2).astype(np.float32), "uint8"),
    (rand_images(2)[..., 0], "shape"),
    (np.zeros((2, 16, 16, 4), np.uint8), "channels"),
    (np.zeros((2, 3, 16, 16), np.uint8), "channels"),   # NCHW instead of NHWC
    (np.zeros((0, 16, 16, 3), np.uint8), "no images"),
])
def test_course_bad_images(tmp_path, images, fragment):
    labels = one_hot([0] * max(len(images), 1), 5)
    with raises_data_error("sprites_t.npy", fragment) as e:
        load_data(save_pair(tmp_path, images, labels))
    one_line(e)


@pytest.mark.parametrize("labels, fragment", [
    (one_hot([0, 1], 5), "2 labels for 3 images"),
    (one_hot([0, 1, 2], 4), "4 columns"),
    (np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0]]), "not one-hot: row 0"),
    (np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]), "not one-hot: row 1"),
    (np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0.5, 0.5, 0, 0, 0]]), "not one-hot: row 2"),
    (np.array([0, 5, 1]), "label 5 at index 1"),
    (np.array([0, -1, 1]), "label -1 at index 1"),
    (np.array([0.0, 1.0, 2.0]), "integers"),
    (np.zeros((3, 5, 1)), "shape"),
])
def test_course_bad_labels(tmp_path, labels, fragment):
    with raises_data_error("sprite_labels_nc_t.npy", fragment) as e:
        load_data(save_pair(tmp_path, rand_images(3), labels))
    one_line(e)


def test_corrupt_npy(tmp_path):
    (tmp_path / "sprites_c.npy").write_bytes(b"this is not an npy file")
    with raises_data_error("sprites_c.npy", "cannot read") as e:
        load_data(str(tmp_path / "sprites_c.npy"))
    one_line(e)


def test_pickled_npy_is_refused_not_run(tmp_path):
    np.save(tmp_path / "sprites_p.npy", np.array([object()] * 3, dtype=object), allow_pickle=True)
    with raises_data_error("sprites_p.npy", "cannot read"):
        load_data(str(tmp_path / "sprites_p.npy"))


def test_labels_option_only_for_npy(tmp_path):
    with raises_data_error("labels file", "only"):
        load_data("emoji16", labels=str(tmp_path / "x.npy"))


# ----------------------------------------------------------------------------- npz

def save_npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_with_integer_labels(tmp_path):
    images = rand_images(4)
    spec = save_npz(tmp_path / "d.npz", images=images, labels=np.array([1, 0, 2, 1], np.int32),
                    class_names=np.array(["cat", "dog", "eel"]))
    data = load_data(spec)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, [1, 0, 2, 1])
    assert data.labels.dtype == np.int64
    assert data.class_names == ("cat", "dog", "eel") and data.num_classes == 3


def test_npz_with_one_hot_labels_and_resize(tmp_path):
    images = rand_images(3, size=32)
    spec = save_npz(tmp_path / "d.npz", images=images, labels=np.eye(2, dtype=np.uint8)[[1, 1, 0]],
                    class_names=np.array(["a", "b"]))
    data = load_data(spec, image_size=16)
    np.testing.assert_array_equal(data.labels, [1, 1, 0])
    np.testing.assert_array_equal(data.images[0], lanczos(images[0], 16))


@pytest.mark.parametrize("arrays, fragment", [
    ({"images": rand_images(2), "labels": np.array([0, 1])}, "missing arrays ['class_names']"),
    ({"images": rand_images(2), "labels": np.array([0, 1]), "class_names": np.array([0, 1])},
     "unicode"),
    ({"images": rand_images(2), "labels": np.array([0, 1]), "class_names": np.array(["a", "a"])},
     "unique"),
    ({"images": rand_images(2), "labels": np.array([0, 2]), "class_names": np.array(["a", "b"])},
     "label 2 at index 1"),
    ({"images": rand_images(2), "labels": np.array([0, 1, 1]), "class_names": np.array(["a", "b"])},
     "3 labels for 2 images"),
    ({"images": rand_images(2).astype(np.int64), "labels": np.array([0, 1]),
      "class_names": np.array(["a", "b"])}, "uint8"),
])
def test_npz_bad_contents(tmp_path, arrays, fragment):
    with raises_data_error("d.npz", fragment) as e:
        load_data(save_npz(tmp_path / "d.npz", **arrays))
    one_line(e)


def test_npz_object_class_names_refused(tmp_path):
    spec = save_npz(tmp_path / "d.npz", images=rand_images(2), labels=np.array([0, 1]),
                    class_names=np.array(["a", "b"], dtype=object))
    with raises_data_error("d.npz", "cannot read"):
        load_data(spec)


@pytest.mark.parametrize("content", [b"garbage bytes", b"PK\x03\x04truncated zip"])
def test_corrupt_npz(tmp_path, content):
    (tmp_path / "d.npz").write_bytes(content)
    with raises_data_error("d.npz", "cannot read") as e:
        load_data(str(tmp_path / "d.npz"))
    one_line(e)


def test_npy_named_npz(tmp_path):
    with open(tmp_path / "d.npz", "wb") as f:
        np.save(f, rand_images(2))
    with raises_data_error("d.npz", "not an .npz"):
        load_data(str(tmp_path / "d.npz"))


def test_missing_path_and_unknown_type(tmp_path):
    with raises_data_error("nope.npz", "no such file") as e:
        load_data(str(tmp_path / "nope.npz"))
    one_line(e)
    (tmp_path / "d.txt").write_text("x")
    with raises_data_error("d.txt", "unsupported"):
        load_data(str(tmp_path / "d.txt"))


# ----------------------------------------------------------------------------- image folder

def save_png(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_image_folder(tmp_path):
    red = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    clear = Image.new("RGBA", (20, 20), (0, 0, 255, 0))   # fully transparent blue
    save_png(tmp_path / "zebra" / "1.png", red)
    save_png(tmp_path / "zebra" / "0.png", clear)
    save_png(tmp_path / "ant" / "a.jpg", Image.new("RGB", (16, 16), (0, 255, 0)).convert("RGB"))
    save_png(tmp_path / "ant" / "b.PNG", Image.new("L", (16, 16), 100))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")          # ignored
    save_png(tmp_path / ".hidden" / "x.png", red)                          # not a class

    data = load_data(str(tmp_path))
    assert data.class_names == ("ant", "zebra")
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1])
    assert data.images.shape == (4, 16, 16, 3) and data.images.dtype == np.uint8
    assert abs(data.images[0].astype(int) - [0, 255, 0]).max() <= 2       # jpeg, near green
    assert (data.images[1] == 100).all()                                  # grey -> RGB
    assert (data.images[2] == 255).all()                                  # transparent -> white
    assert (data.images[3] == [255, 0, 0]).all()                          # red, resized 20 -> 16


def test_image_folder_resize_uses_lanczos(tmp_path):
    image = rand_images(1, size=24)[0]
    save_png(tmp_path / "c" / "x.png", Image.fromarray(image))
    np.testing.assert_array_equal(load_data(str(tmp_path)).images[0], lanczos(image, 16))


def test_empty_folder(tmp_path):
    with raises_data_error(str(tmp_path), "no class sub-folders") as e:
        load_data(str(tmp_path))
    one_line(e)


def test_class_folder_without_images(tmp_path):
    save_png(tmp_path / "a" / "x.png", Image.new("RGB", (16, 16)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with raises_data_error(str(tmp_path / "b"), "no images"):
        load_data(str(tmp_path))


def test_corrupt_png_is_named(tmp_path):
    save_png(tmp_path / "a" / "good.png", Image.new("RGB", (16, 16)))
    (tmp_path / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with raises_data_error("bad.png", "cannot read image") as e:
        load_data(str(tmp_path))
    one_line(e)


def test_truncated_png_is_named(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(rand_images(1, size=32)[0]).save(buf, "PNG")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with raises_data_error("cut.png", "cannot read image"):
        load_data(str(tmp_path))


# ----------------------------------------------------------------------------- split_indices

def test_split_indices_is_deterministic_and_partitions():
    train, holdout = split_indices(100, 0.2, seed=3)
    assert len(holdout) == 20 and len(train) == 80
    assert train.dtype == holdout.dtype == np.int64
    np.testing.assert_array_equal(np.sort(np.concatenate([train, holdout])), np.arange(100))
    again = split_indices(100, 0.2, seed=3)
    np.testing.assert_array_equal(again[1], holdout)
    assert not np.array_equal(split_indices(100, 0.2, seed=4)[1], holdout)
    # Locked so a change of RNG use (and so of every evaluation split) is noticed.
    expected = np.sort(np.random.default_rng(3).permutation(100)[:20])
    np.testing.assert_array_equal(holdout, expected)


def test_split_indices_edges():
    assert [len(x) for x in split_indices(10, 0.0, 0)] == [10, 0]
    assert [len(x) for x in split_indices(10, 0.01, 0)] == [9, 1]   # at least one held out
    assert [len(x) for x in split_indices(2, 0.99, 0)] == [1, 1]    # never all held out


@pytest.mark.parametrize("n, fraction", [(0, 0.1), (-1, 0.1), (10, 1.0), (10, -0.1),
                                         (10, float("nan"))])
def test_split_indices_bad_arguments(n, fraction):
    with pytest.raises(DataError):
        split_indices(n, fraction, 0)


# ----------------------------------------------------------------------------- build_emoji16

def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def make_tarball(path: Path, vendor: str, records: list[dict], pngs: dict[str, bytes]) -> Path:
    """An in-memory-built stand-in for an emoji-datasource-<vendor> npm tarball."""
    files = {"package/emoji.json": json.dumps(records).encode()}
    files |= {f"package/img/{vendor}/64/{name}": data for name, data in pngs.items()}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def record(image: str, category: str, vendor: str, skins: tuple[str, ...] = ()) -> dict:
    has = f"has_img_{vendor}"
    return {"image": image, "category": category, has: True,
            "skin_variations": {s: {"image": s, has: True} for s in skins} or None}


def fake_tarballs(tmp_path: Path) -> dict[str, Path]:
    solid = png_bytes(Image.new("RGBA", (64, 64), (10, 20, 30, 255)))
    clear = png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))
    twitter = [record("b.png", "Flags", "twitter"),
               record("a.png", "People & Body", "twitter", skins=("a-1.png",)),
               record("tone.png", "Component", "twitter"),
               {**record("none.png", "Objects", "twitter"), "has_img_twitter": False}]
    google = [record("c.png", "Smileys & Emotion", "google")]
    return {
        "twitter": make_tarball(tmp_path / "t.tgz", "twitter", twitter, {
            "a.png": solid, "a-1.png": clear, "b.png": solid, "tone.png": solid,
            "extra.png": solid}),
        "google": make_tarball(tmp_path / "g.tgz", "google", google, {"c.png": clear}),
    }


def test_category_mapping():
    assert be.CLASS_NAMES == EMOJI16_CLASSES
    categories = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                  "Travel & Places", "Activities", "Objects", "Symbols", "Flags"]
    assert [be.category_label(c) for c in categories] == list(range(9))
    assert be.category_label("Component") is None
    with pytest.raises(be.BuildError, match="Shapes"):
        be.category_label("Shapes")


def test_to_rgb16_composites_on_white_then_lanczos():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, 32:] = (200, 0, 0, 255)      # opaque red right half
    rgba[:, :32] = (0, 0, 255, 0)        # transparent blue left half: must turn white
    out = be.to_rgb16(png_bytes(Image.fromarray(rgba)))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[:, 0] == 255).all() and (out[:, -1] == [200, 0, 0]).all()
    rgb = rgba[..., :3].copy()
    rgb[:, :32] = 255
    np.testing.assert_array_equal(out, lanczos(rgb, 16))
    nearest = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.NEAREST))
    assert not np.array_equal(out, nearest)  # the filter matters at the edge


def test_to_rgb16_half_transparent_blends_with_white():
    out = be.to_rgb16(png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 128))))
    assert np.abs(out.astype(int) - 127).max() <= 1


def test_build_on_a_fake_package(tmp_path):
    arrays = be.build(fake_tarballs(tmp_path))
    # twitter first, by image name; Component, has_img False and unlisted PNGs left out.
    assert list(arrays["source"]) == ["twitter/a-1.png", "twitter/a.png", "twitter/b.png",
                                      "google/c.png"]
    np.testing.assert_array_equal(arrays["labels"], [1, 1, 8, 0])  # skin tone inherits People
    assert arrays["labels"].dtype == np.int64
    assert arrays["images"].shape == (4, 16, 16, 3) and arrays["images"].dtype == np.uint8
    assert (arrays["images"][0] == 255).all() and (arrays["images"][1] == [10, 20, 30]).all()
    assert tuple(arrays["class_names"]) == EMOJI16_CLASSES
    assert json.loads(str(arrays["packages"]))["emoji-datasource-google"] == "16.0.0"


def test_build_main_writes_a_loadable_reproducible_npz(tmp_path, capsys):
    tgz = fake_tarballs(tmp_path)
    args = ["--twitter", str(tgz["twitter"]), "--google", str(tgz["google"])]
    assert be.main([*args, "-o", str(tmp_path / "a.npz")]) == 0
    assert be.main([*args, "-o", str(tmp_path / "b.npz")]) == 0
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "g.tgz", "t.tgz"]
    data = load_data(str(tmp_path / "a.npz"))
    assert len(data) == 4 and data.class_names == EMOJI16_CLASSES
    assert "4 images" in capsys.readouterr().out


def test_build_fails_loudly_on_a_bad_package(tmp_path):
    tgz = fake_tarballs(tmp_path)
    bad = [record("q.png", "Shapes", "google")]
    tgz["google"] = make_tarball(tmp_path / "bad.tgz", "google", bad, {"q.png": b""})
    with pytest.raises(be.BuildError, match="unknown emoji category 'Shapes'"):
        be.build(tgz)
    tgz["google"] = make_tarball(tmp_path / "miss.tgz", "google",
                                 [record("q.png", "Flags", "google")], {})
    with pytest.raises(be.BuildError, match="q.png"):
        be.build(tgz)


def test_build_without_npm_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(be.shutil, "which", lambda name: None)
    assert be.main(["-o", str(tmp_path / "x.npz")]) == 2
    assert "npm is not installed" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
