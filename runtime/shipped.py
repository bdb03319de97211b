"""The models and data that ship inside the package, found the same way in a wheel and a checkout.

The repository's `models/` folder is the import package `mdx.models` (pyproject.toml maps it;
its `*.onnx` files are package data), so a wheel carries the files a checkout shows in
`models/`, and `importlib.resources` finds them in both: in an installed wheel under
site-packages/mdx/models, in an editable install in the repository's `models/` itself. There
is one copy in git.

The evaluator's real images are the emoji16 training set, `train/data/emoji16.npz`, which
ships as package data of `mdx.train`. `mdx.models` and `mdx.train` are siblings in both
layouts (site-packages/mdx/{models,train} in a wheel; the repository's models/ and train/,
which an editable install maps), so the file is found beside the models folder: the runtime
neither imports mdx.train (it needs torch) nor asks the import system about it.

    shipped_models()              # ('emoji16', 'emoji16-fp16', 'emoji16-int8')
    resolve_model("emoji16")      # a shipped model's name, or a path to a contract .onnx
    resolve_model(None)           # the default: $MDX_MODEL, ./models/emoji16.onnx, the shipped emoji16
    classifier_path(), real_data_path()
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from mdx.runtime.contract import ModelError

MODELS_PACKAGE = "mdx.models"
DEFAULT_MODEL = "emoji16"
CLASSIFIER = "emoji16-classifier"  # mdx-eval's classifier: shipped with the models, not a diffusion model
REAL_DATA = Path("train") / "data" / "emoji16.npz"  # mdx.train's package data, relative to models/'s parent
LOCAL_MODEL = Path("models") / f"{DEFAULT_MODEL}.onnx"  # where mdx-export's own models go, in the working folder


class ShippedDataError(ModelError):
    """A file that should ship with the package is not there (a broken or partial install)."""


# --- where the files are --------------------------------------------------------------


def models_dir() -> Path:
    """The folder of the shipped models (the package `mdx.models`)."""
    try:
        root = importlib.resources.files(MODELS_PACKAGE)
    except ModuleNotFoundError:
        raise ShippedDataError(f"the package {MODELS_PACKAGE} (the shipped models) is not installed; "
                               "reinstall microdiffusion") from None
    if not isinstance(root, Path):  # e.g. a zipped install: onnxruntime needs real files
        raise ShippedDataError(f"the shipped models are not plain files on disk ({root}); install the wheel unzipped")
    return root


def shipped_models() -> tuple[str, ...]:
    """The names of the shipped diffusion models (file names without .onnx), sorted."""
    return tuple(sorted(p.stem for p in models_dir().glob("*.onnx") if p.stem != CLASSIFIER))


def shipped_model(name: str) -> Path:
    """The file of the shipped model `name` (e.g. "emoji16" or "emoji16-int8")."""
    names = shipped_models()
    if name not in names:
        raise ModelError(f"unknown model {name!r}: not a file, and not a shipped model "
                         f"(shipped: {', '.join(names) or 'none'})")
    return models_dir() / f"{name}.onnx"


def classifier_path() -> Path:
    """The classifier mdx-eval scores with (it may be missing; the evaluator says so)."""
    return models_dir() / f"{CLASSIFIER}.onnx"


def real_data_path() -> Path:
    """Where the emoji16 data set lies (beside the models; see the module docstring). Not
    checked here: the evaluator reports a missing file with the path it looked at."""
    return models_dir().parent / REAL_DATA


# --- what a --model value means -------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or Path(text).suffix != ""


def resolve_model(model: str | os.PathLike | None = None) -> Path:
    """The model file for a `--model` value: an existing file, else a shipped model's name;
    None means the default (`default_model`)."""
    if model is None:
        return default_model()
    path = Path(model)
    if path.is_file():
        return path
    if path.exists():
        raise ModelError(f"model path {path} is not a file")
    text = os.fspath(model)
    if _looks_like_path(text) or not text:
        raise ModelError(f"model file {text} does not exist (shipped models, by name: "
                         f"{', '.join(shipped_models()) or 'none'})")
    return shipped_model(text)


def default_model_candidates() -> list[tuple[str, Path]]:
    """Where the default model is looked for, in order: $MDX_MODEL, ./models/emoji16.onnx
    (a model exported into the working folder), the shipped emoji16."""
    found = []
    if os.environ.get("MDX_MODEL"):
        found.append(("$MDX_MODEL", Path(os.environ["MDX_MODEL"])))
    found.append(("./models", Path.cwd() / LOCAL_MODEL))
    try:
        found.append(("the shipped models", models_dir() / f"{DEFAULT_MODEL}.onnx"))
    except ShippedDataError:
        pass  # reported below as "no default model found", with where it looked
    return found


def default_model() -> Path:
    """The first default candidate that exists; $MDX_MODEL, when set, must exist (a file or a
    shipped name)."""
    env = os.environ.get("MDX_MODEL")
    if env:
        if Path(env).is_file():
            return Path(env)
        if not _looks_like_path(env) and env in shipped_models():
            return shipped_model(env)
        raise ModelError(f"MDX_MODEL points to {env}, which does not exist "
                         f"(a file, or a shipped model: {', '.join(shipped_models()) or 'none'})")
    candidates = default_model_candidates()
    for _, path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for _, p in candidates)
    raise ModelError(f"no --model given and no default model found (looked for {looked}); pass --model FILE, "
                     f"or train and export one: mdx-train, then mdx-export to {LOCAL_MODEL} (see the README)")
