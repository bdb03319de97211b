"""Helpers for the runtime tests: export a tiny contract model with torch.

The runtime itself never imports torch; only these test helpers do. They export a small
ContextUnet straight with torch.onnx (seconds, where the full exporter with its parity
checks takes much longer) and give it the metadata the exporter writes, built by the same
`mdx.runtime.contract.model_metadata`, so the runtime tests run on files that follow
docs/contract.md (inputs `sample`, `timestep`, `context`; output `model_output`; dynamic
batch; opset 17; weights embedded; every key of `contract.REQUIRED_METADATA`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np

from mdx.runtime import contract

TINY = dict(n_feat=16, n_classes=3, image_size=16, num_train_timesteps=50)
TINY_CLASSES = ["apple", "ball", "cat"]
TINY_SCHEDULE = {"kind": "linear", "num_train_timesteps": 50, "beta_start": 1e-4, "beta_end": 0.02}


def contract_metadata(model, class_names, schedule: dict, *, prediction_type="epsilon",
                      recommended: dict | None = None) -> dict[str, str]:
    """The `mdx.*` metadata_props the exporter would write for `model` (a ContextUnet)."""
    from mdx.train.model import count_parameters

    config = model.config
    return contract.model_metadata(
        image_size=config.image_size, channels=config.in_channels, class_names=class_names, schedule=schedule,
        prediction_type=prediction_type, precision="fp32", train_config={"model": config.to_dict()},
        checkpoint_sha256="0" * 64, parameters=count_parameters(model), recommended=recommended)


def make_model(seed: int = 0, **config):
    """A ContextUnet with random weights and non-trivial BatchNorm statistics, in eval mode."""
    import torch

    from mdx.train.model import ContextUnet, ModelConfig

    torch.manual_seed(seed)
    model = ContextUnet(ModelConfig(**{**TINY, **config}))
    # Fresh BatchNorm running stats are (0, 1): give them values so that eval mode is
    # not an identity and the parity tests exercise the folded normalisation too.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    return model.eval()


def export_model(model, path: Path, metadata: dict[str, str] | None) -> Path:
    """Export `model` to `path` per the contract (dynamic batch) and set `metadata` (None: none)."""
    import onnx
    import torch

    cfg = model.config
    batch = torch.export.Dim("batch", min=1, max=4096)
    args = (
        torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size),
        torch.zeros(2),
        torch.zeros(2, cfg.n_classes),
    )
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on opset conversion and axis names
        torch.onnx.export(
            model.eval(), args, str(path), dynamo=True, opset_version=17, external_data=False,
            input_names=list(contract.INPUTS), output_names=[contract.OUTPUT],
            dynamic_shapes={"sample": {0: batch}, "timestep": {0: batch}, "context": {0: batch}},
            verbose=False,
        )
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def export_tiny(path: Path, *, seed: int = 0, metadata: bool = True, recommended: dict | None = None,
                prediction_type: str = "epsilon", **config):
    """Build and export a tiny contract model; returns (torch model, path)."""
    model = make_model(seed, **config)
    meta = None
    if metadata:
        cfg = model.config
        names = TINY_CLASSES if cfg.n_classes == 3 else [f"class{i}" for i in range(cfg.n_classes)]
        schedule = {**TINY_SCHEDULE, "num_train_timesteps": cfg.num_train_timesteps}
        meta = contract_metadata(model, names, schedule, prediction_type=prediction_type,
                                 recommended=recommended)
    return model, export_model(model, path, meta)


def edit_metadata(src: Path, dst: Path, drop: list[str] | None = None,
                  updates: dict[str, str] | None = None) -> Path:
    """Copy an ONNX file, dropping the named metadata keys (all `mdx.*` keys when drop is None
    and no updates are given) and setting `updates`."""
    import onnx

    proto = onnx.load(str(src))
    if drop is None and updates is None:
        drop = [p.key for p in proto.metadata_props if p.key.startswith("mdx.")]
    drop = set(drop or []) | set(updates or {})
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in drop]
    del proto.metadata_props[:]
    for key, value in [*keep, *(updates or {}).items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(dst))
    return Path(dst)


_CACHE: dict = {}


def cached_tiny(seed: int = 0, recommended: dict | None = None, **config):
    """export_tiny, once per test process (the export takes ~15 s on two busy cores);
    the files live in a temporary folder removed at exit. Returns (torch model, path)."""
    import atexit
    import shutil
    import tempfile

    key = (seed, json.dumps(recommended, sort_keys=True), tuple(sorted(config.items())))
    if key not in _CACHE:
        if "dir" not in _CACHE:
            _CACHE["dir"] = Path(tempfile.mkdtemp(prefix="mdx-runtime-tests-"))
            atexit.register(shutil.rmtree, _CACHE["dir"], True)
        path = _CACHE["dir"] / f"tiny{len(_CACHE)}.onnx"
        with torch_one_thread():
            _CACHE[key] = export_tiny(path, seed=seed, recommended=recommended, **config)
    return _CACHE[key]


@contextlib.contextmanager
def torch_one_thread():
    """torch on one thread for the duration: with two threads on two shared, busy cores its
    OpenMP barriers slow a short loop down by 10-50x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_forward(model, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad(), torch_one_thread():
        return model(torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(context)).numpy()


def write_wrong_signature_model(path: Path) -> Path:
    """A valid ONNX model that is not a contract model: one input `x`, output `y` = x."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 16, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return Path(path)


def fail_temporary_file(monkeypatch, name: str, code: int) -> None:
    """mdx.runtime.fileio cannot create the temporary file for the target called `name`: its
    first write fails with OSError(code) (ENOSPC: a full disk, EROFS: a read-only file system)."""
    import os

    from mdx.runtime import fileio

    real = fileio.tempfile.mkstemp

    def mkstemp(*args, prefix: str = "", **kwargs):
        if prefix.startswith(f".{name}."):
            raise OSError(code, os.strerror(code))
        return real(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)


def cli_invoker(command, monkeypatch, tmp_path):
    """A function running the click `command` in an empty working folder (tmp_path) without
    $MDX_MODEL; it returns click's Result. `main=` picks another command for one call."""
    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MDX_MODEL", raising=False)

    def invoke(*args, main=command):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def shard_arrays(folder):
    """Every mdx-generate shard's arrays under `folder`, by file name."""
    found = {}
    for path in sorted(Path(folder).glob("shard-*.npz")):
        with np.load(path) as data:
            found[path.name] = {k: data[k] for k in data.files}
    return found


def auto_provider(path) -> str:
    """The provider `--provider auto` really runs `path` on here: the CPU provider, CUDA, or
    OpenVINO on an Intel CPU with AVX-512 where its plugin is installed (providers.py's rule)."""
    from mdx.runtime.session import OnnxDenoiser

    return OnnxDenoiser.load(path, provider="auto", threads=1).provider
