"""mdx-export: torch -> ONNX export, simplification, validation, fp16/int8, and every bad input.

A tiny model (n_feat=16, 3 classes, T=50) keeps each export to a few seconds; the real
exports (opset 17, opset 18 through the CLI, fp16, int8) are made once per module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from mdx.export import onnx_export
from mdx.export.cli import main
from mdx.export.onnx_export import ExportError, ExportFailure, export_checkpoint, parse_recommended
from mdx.export.quantize import (CALIBRATION_IMAGES, CalibrationError, CalibrationReader, context_dependent_nodes,
                                 int8_convs, make_calibration_set, quantize_int8)
from mdx.export.validate import (REQUIRED_METADATA, TOLERANCES, ValidationError, parity_inputs, validate_onnx)
from mdx.runtime.schedules import make_schedule
from mdx.train.checkpoint import load_checkpoint, make_run_config, save_weights_file
from mdx.train.model import ContextUnet, ModelConfig

T = 50
CLASSES = ["smileys", "people", "animals"]  # a subset of emoji16's, so int8 calibration matches by name
TINY = ModelConfig(n_feat=16, n_classes=3, image_size=16, num_train_timesteps=T)


# --- fixtures ---------------------------------------------------------------------------------


def tiny_config(model_config: ModelConfig = TINY, **overrides) -> dict:
    cfg = make_run_config(model_config, make_schedule("linear", model_config.num_train_timesteps), CLASSES,
                          train={"data": "emoji16", "image_size": 16, "cond_drop": 0.1})
    cfg.update(overrides)
    return cfg


def make_run(root: Path, name: str = "run-tiny", seed: int = 0) -> Path:
    """A run folder with checkpoint/{ema,model}.safetensors and progress.json, BatchNorm stats set."""
    torch.manual_seed(seed)
    model = ContextUnet(TINY)
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = root / name / "checkpoint"
    ckpt.mkdir(parents=True)
    save_weights_file(ckpt / "ema.safetensors", model, tiny_config(), step=123)
    save_weights_file(ckpt / "model.safetensors", model, tiny_config(), step=123)
    (ckpt / "progress.json").write_text(json.dumps({"step": 123}))
    return root / name


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def run(work) -> Path:
    return make_run(work)


@pytest.fixture(scope="module")
def fp32(work, run):
    """The fp32 opset-17 export, made once (default output name, from the run folder's cwd)."""
    cwd = os.getcwd()
    os.chdir(work)
    try:
        report = export_checkpoint(run, verbose=False)
    finally:
        os.chdir(cwd)
    return work / report.path, report


@pytest.fixture(scope="module")
def loaded(run):
    return load_checkpoint(run)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.suffix == ".onnx")


# --- the fp32 export and the contract ---------------------------------------------------------


def test_fp32_opset17_export_and_report(fp32):
    path, report = fp32
    assert report.path == Path("models") / "run-tiny.onnx" and path.is_file()  # the default name
    assert report.opset == 17 and report.method == "dynamo" and report.simplified
    assert report.nodes_after <= report.nodes_before and report.bytes_after > 0
    assert report.final_bytes == path.stat().st_size
    v = report.validation
    assert [r.batch for r in v.parity] == [1, 7, 64]
    assert all(r.max_abs <= 1e-4 for r in v.parity)
    assert leftovers(path.parent) == ["run-tiny.onnx"]  # no temporary file beside it


def test_contract_names_dtypes_dynamic_batch(fp32, loaded):
    path, _ = fp32
    model = onnx.load(str(path))
    assert model.opset_import[0].domain in ("", "ai.onnx") and model.opset_import[0].version == 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert len(list(path.parent.iterdir())) == 1  # no external-data file either
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins, outs = sess.get_inputs(), sess.get_outputs()
    assert [i.name for i in ins] == ["sample", "timestep", "context"]
    assert [o.name for o in outs] == ["model_output"]
    assert all(v.type == "tensor(float)" for v in ins + outs)
    batch = ins[0].shape[0]
    assert isinstance(batch, str)
    assert ins[0].shape == [batch, 3, 16, 16] and ins[1].shape == [batch] and ins[2].shape == [batch, 3]
    assert outs[0].shape == [batch, 3, 16, 16]
    for b in (3, 5):  # any batch runs and matches torch
        feeds = parity_inputs(b, 3, 16, 3, T, np.random.default_rng(b))
        (y,) = sess.run(None, feeds)
        with torch.no_grad():
            ref = loaded.model(*[torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "context")]).numpy()
        assert y.shape == (b, 3, 16, 16)
        np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)


def test_metadata(fp32, loaded):
    path, _ = fp32
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(REQUIRED_METADATA) <= set(meta)
    assert all(k.startswith("mdx.") for k in meta)  # onnxsim's and the quantizer's notes removed
    assert meta["mdx.format"] == "1" and meta["mdx.precision"] == "fp32"
    assert meta["mdx.image_size"] == "16" and meta["mdx.channels"] == "3"
    assert json.loads(meta["mdx.classes"]) == CLASSES
    assert json.loads(meta["mdx.schedule"]) == make_schedule("linear", T).to_dict()
    assert meta["mdx.prediction_type"] == "epsilon" and meta["mdx.num_train_timesteps"] == str(T)
    assert json.loads(meta["mdx.train_config"]) == loaded.config
    assert meta["mdx.checkpoint_sha256"] == loaded.sha256
    assert meta["mdx.parameters"] == str(sum(p.numel() for p in loaded.model.parameters()))
    assert "mdx.recommended" not in meta
    assert model.producer_name == "mdx-export" and model.model_version == 123
    assert "ContextUnet" in model.doc_string and "float32 weights" in model.doc_string
    assert all(v.doc_string for v in list(model.graph.input) + list(model.graph.output))


def test_opset18_through_the_cli_with_recommended(work, run):
    out = work / "cli" / "m18.onnx"
    rec = '{"sampler": "dpmpp", "steps": 20, "guidance": 2}'
    res = CliRunner().invoke(main, [str(run), "-o", str(out), "--opset", "18", "--recommended", rec])
    assert res.exit_code == 0, res.output
    assert "dynamo exporter" in res.output and "onnxsim" in res.output and "rel RMS" in res.output
    model = onnx.load(str(out))
    assert {i.domain: i.version for i in model.opset_import}[""] == 18
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["mdx.recommended"]) == {"sampler": "dpmpp", "steps": 20, "guidance": 2.0}
    assert leftovers(out.parent) == ["m18.onnx"]


# --- fp16 and int8 ----------------------------------------------------------------------------


def test_fp16_round_trip(work, run, loaded):
    out = work / "fp16" / "m.onnx"
    report = export_checkpoint(run, out, precision="fp16", simplify=False, verbose=False)
    model = onnx.load(str(out))
    floats = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    big = [t for t in floats if int(np.prod(t.dims)) > 16]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)  # weights in float16
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert all(v.type == "tensor(float)" for v in sess.get_inputs() + sess.get_outputs())  # float32 I/O
    assert {p.key: p.value for p in model.metadata_props}["mdx.precision"] == "fp16"
    rows = report.validation.parity
    assert all(0 < r.rel_rms <= TOLERANCES["fp16"][1] for r in rows)
    # The same file validates again on its own (validate.py is usable without the exporter).
    again = validate_onnx(out, loaded.model, loaded.schedule, "fp16", opset=17)
    assert again.ok and not report.simplified


def test_int8_round_trip(work, run):
    out = work / "int8" / "m.onnx"
    report = export_checkpoint(run, out, precision="int8", verbose=False)
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    q = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert q, "no int8 weights"
    zero_points = {t.data_type for t in model.graph.initializer if t.name.endswith("zero_point")}
    assert onnx.TensorProto.UINT8 in zero_points  # u8 activations by default (ORT's fused x86 path)
    assert "uint8 activations" in model.doc_string
    # per-channel: some weight scales are vectors
    assert any(len(t.dims) == 1 and t.dims[0] > 1 for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT and "scale" in t.name)
    assert {i.domain: i.version for i in model.opset_import}[""] == 17
    assert {p.key: p.value for p in model.metadata_props}["mdx.precision"] == "int8"
    assert report.calibration.startswith(f"{CALIBRATION_IMAGES} emoji16 images") and "matched by name" in report.calibration
    # convolutions only, and of them only those upstream of the class context (quantize.py);
    # those that read x_t stay float32
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    produced_by = {o: n for n in model.graph.node for o in n.output}
    quantized = [n for n in convs if produced_by.get(n.input[1]) is not None
                 and produced_by[n.input[1]].op_type == "DequantizeLinear"]
    tainted = context_dependent_nodes(model.graph)
    assert quantized and all(n.name not in tainted for n in quantized)
    assert all(n not in quantized for n in convs if "sample" in n.input) and convs[-1] not in quantized
    assert [n.name for n in convs if n.name not in tainted and "sample" not in n.input] == [n.name for n in quantized]
    assert "class-context-free convolutions" in model.doc_string
    assert not any(n.op_type in ("Gemm", "MatMul") and n.input[0] in produced_by
                   and produced_by[n.input[0]].op_type == "DequantizeLinear" for n in model.graph.node)
    assert all(r.rel_rms <= TOLERANCES["int8"][1] for r in report.validation.parity)
    assert out.stat().st_size < report.bytes_after  # int8 weights, though QDQ nodes weigh on a model this small


def _guidance_difference(path: Path, n: int = 32) -> np.ndarray:
    """eps_c - eps_u of the file on noised-like inputs, the term classifier-free guidance scales."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, 3, 16, 16), dtype=np.float32)
    t = rng.integers(0, T, n).astype(np.float32)
    c = np.eye(len(CLASSES), dtype=np.float32)[rng.integers(0, len(CLASSES), n)]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"sample": np.concatenate([x, x]), "timestep": np.concatenate([t, t]),
                        "context": np.concatenate([c, np.zeros_like(c)])})[0]
    return y[:n] - y[n:]


def test_int8_context_free_scope_keeps_the_guidance_difference(work, run, fp32):
    """The default scope's rounding errors cancel in eps_c - eps_u; scope "all" quantizes the up path too."""
    ref = _guidance_difference(fp32[0])
    graph = onnx.load(str(fp32[0]))
    errors, counts = {}, {}
    for scope in ("context-free", "all"):
        out = work / f"int8-{scope}" / "m.onnx"
        export_checkpoint(run, out, precision="int8", int8_scope=scope, verbose=False)
        d = _guidance_difference(out)
        errors[scope] = float(np.sqrt(np.mean((d - ref) ** 2) / np.mean(ref ** 2)))
        quantized, kept = int8_convs(graph, scope)
        assert quantized and set(quantized).isdisjoint(kept)
        counts[scope] = len(quantized)
    assert errors["context-free"] < 0.5 * errors["all"], errors
    assert counts["all"] > counts["context-free"]


def _graph(nodes: list, inputs=("sample", "context")) -> onnx.ModelProto:
    vi = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs]
    out = [onnx.helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)]
    return onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", vi, out))


def test_context_dependent_nodes_follow_the_graph():
    mk = onnx.helper.make_node
    g = _graph([mk("Conv", ["sample", "w0"], ["a"], name="c0"), mk("Conv", ["a", "w1"], ["b"], name="c1"),
                mk("Mul", ["b", "context"], ["m"], name="mod"), mk("Relu", ["a"], ["r"], name="side"),
                mk("Conv", ["m", "w2"], ["d"], name="c2"), mk("Add", ["d", "r"], ["e"], name="join"),
                mk("Conv", ["e", "w3"], ["y"], name="c3"), mk("Shape", ["context"], ["s"], name="batch"),
                mk("Reshape", ["a", "s"], ["z"], name="by_shape")])
    assert context_dependent_nodes(g.graph) == {"mod", "c2", "join", "c3"}  # Shape reads no values
    assert int8_convs(g, "context-free") == (["c1"], ["c0", "c2", "c3"])
    assert int8_convs(g, "all") == (["c1", "c2"], ["c0", "c3"])
    with pytest.raises(ValueError, match="unknown int8 scope 'half'"):
        int8_convs(g, "half")


def test_int8_scope_with_nothing_to_quantize_is_refused():
    mk, h = onnx.helper.make_node, onnx.helper
    w = onnx.numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    graph = h.make_graph([mk("Mul", ["sample", "context"], ["m"], name="mod"), mk("Conv", ["m", "w"], ["y"], name="c")],
                         "g", [h.make_tensor_value_info("sample", onnx.TensorProto.FLOAT, [1, 3, 4, 4]),
                               h.make_tensor_value_info("context", onnx.TensorProto.FLOAT, [1, 3, 1, 1])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 2, 2])], initializer=[w])
    g = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    assert int8_convs(g, "context-free") == ([], ["c"])

    class Unread(CalibrationReader):
        def get_next(self):  # the refusal comes before any calibration
            raise AssertionError("calibration ran")

    with pytest.raises(CalibrationError, match="no convolution to quantize with int8 scope 'context-free'"):
        quantize_int8(g, Unread(None))


def test_calibration_set_is_deterministic_and_spread(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "small.npz"  # fewer than 256 images: repeated with fresh noise
    np.savez(npz, images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
             labels=rng.integers(0, 3, 40), class_names=np.array(CLASSES))
    sched = make_schedule("linear", T)
    a = make_calibration_set(str(npz), sched, CLASSES, 3, 16)
    b = make_calibration_set(str(npz), sched, CLASSES, 3, 16)
    assert len(a) == CALIBRATION_IMAGES and a.sample.shape == (CALIBRATION_IMAGES, 3, 16, 16)
    assert a.sample.dtype == np.float32 and CALIBRATION_IMAGES >= 256
    np.testing.assert_array_equal(a.sample, b.sample)
    np.testing.assert_array_equal(a.context, b.context)
    t = a.timestep.astype(int)
    assert t.min() == 0 and t.max() == T - 1 and len(np.unique(t)) == T  # every timestep covered
    sums = a.context.sum(1)
    assert set(np.unique(sums)) == {0.0, 1.0} and (sums == 0).sum() == round(CALIBRATION_IMAGES * 0.1)
    reader = CalibrationReader(a, batch_size=100)
    sizes = [len(reader.get_next()["sample"]) for _ in range(-(-CALIBRATION_IMAGES // 100))]
    assert sizes == [100] * (CALIBRATION_IMAGES // 100) + [CALIBRATION_IMAGES % 100] and reader.get_next() is None
    reader.rewind()
    assert reader.get_next()["timestep"].shape == (100,)


# --- the validation can fail -------------------------------------------------------------------


def _edited(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src))
    edit(model)
    onnx.save(model, str(dst))
    return dst


def _perturb_weight(model: onnx.ModelProto, delta: float = 0.05) -> None:
    # The weight of the layer that writes the output: an untrained model's deep paths are too
    # weak (and GroupNorm too forgiving) for a change elsewhere to be sure to show.
    last = next(n for n in model.graph.node if "model_output" in n.output)
    inits = {t.name: t for t in model.graph.initializer}
    t = next(inits[i] for i in last.input if i in inits and len(inits[i].dims) > 1)
    w = onnx.numpy_helper.to_array(t).copy()
    w += delta * np.random.default_rng(0).standard_normal(w.shape).astype(w.dtype)  # a constant shift could be normalised away
    t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))


def test_validation_catches_wrong_numbers(fp32, loaded, tmp_path):
    bad = _edited(fp32[0], tmp_path / "bad.onnx", _perturb_weight)
    with pytest.raises(ValidationError) as e:
        validate_onnx(bad, loaded.model, loaded.schedule, "fp32")
    msg = str(e.value)
    assert "parity with torch" in msg and "exceeds 0.0001" in msg and "FAILED" in msg
    assert len(e.value.report.parity) == 3 and not e.value.report.ok
    # a tolerance can be tightened: the good file fails an impossible bound
    with pytest.raises(ValidationError, match="max \\|err\\|"):
        validate_onnx(fp32[0], loaded.model, loaded.schedule, "fp32", tolerance=0.0, batch_sizes=(7,))


def _add_random_op(model):
    model.graph.node.append(onnx.helper.make_node("RandomNormalLike", ["sample"], ["noise"]))


def _rename_input(model):
    for node in model.graph.node:
        node.input[:] = ["x" if i == "sample" else i for i in node.input]
    model.graph.input[0].name = "x"


def _fix_batch(model):
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 2


def _drop_metadata(model):
    del model.metadata_props[:]


def _wrong_precision(model):
    for p in model.metadata_props:
        if p.key == "mdx.precision":
            p.value = "int8"


@pytest.mark.parametrize("edit, stage", [
    (_add_random_op, "static graph"),
    (_rename_input, "contract"),
    (_fix_batch, "contract"),
    (_drop_metadata, "metadata"),
    (_wrong_precision, "metadata"),
])
def test_validation_catches_broken_graphs(fp32, loaded, tmp_path, edit, stage):
    bad = _edited(fp32[0], tmp_path / "bad.onnx", edit)
    with pytest.raises(ValidationError, match=f"validation failed: {stage}"):
        validate_onnx(bad, loaded.model, loaded.schedule, "fp32")


def test_validation_catches_external_data_opset_and_garbage(fp32, loaded, tmp_path):
    model = onnx.load(str(fp32[0]))
    ext = tmp_path / "ext.onnx"
    onnx.save(model, str(ext), save_as_external_data=True, location="ext.data", size_threshold=0)
    with pytest.raises(ValidationError, match="self-contained"):
        validate_onnx(ext, loaded.model, loaded.schedule)
    with pytest.raises(ValidationError, match="opset is 17, 18 was requested"):
        validate_onnx(fp32[0], loaded.model, loaded.schedule, opset=18)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValidationError, match="load"):
        validate_onnx(junk, loaded.model, loaded.schedule)


@pytest.fixture
def exported_proto(fp32, monkeypatch):
    """Replace the (slow) torch export by the already exported model, optionally edited."""

    def use(edit=None):
        def fake(model, opset, log):
            proto = onnx.load(str(fp32[0]))
            if edit:
                edit(proto)
            return proto, "dynamo", 0.0

        monkeypatch.setattr(onnx_export, "torch_to_onnx", fake)

    return use


def test_failed_validation_leaves_no_file_and_exits_1(exported_proto, run, tmp_path):
    exported_proto(_perturb_weight)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous model")  # an existing file is kept when the new one fails
    res = CliRunner().invoke(main, [str(run), "-o", str(out)])
    assert res.exit_code == 1
    assert "mdx-export: error: validation failed: parity with torch" in res.output
    assert "FAILED" in res.output and "no file written" in res.output and "Traceback" not in res.output
    assert out.read_bytes() == b"previous model" and leftovers(tmp_path) == ["m.onnx"]


def test_interrupt_removes_the_temporary_file(exported_proto, run, tmp_path, monkeypatch):
    exported_proto()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "validate_onnx", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(run, tmp_path / "m.onnx", verbose=False)
    assert leftovers(tmp_path) == []


def test_torchscript_fallback_is_announced(run, tmp_path, monkeypatch, capsys):
    def wrong_opset(model, args, opset):  # the dynamo exporter keeping opset 18 counts as a failure
        proto = onnx_export._export_torchscript(model, args, 18)
        return proto

    monkeypatch.setattr(onnx_export, "_export_dynamo", wrong_opset)
    report = export_checkpoint(run, tmp_path / "m.onnx", opset=17)
    assert report.method == "torchscript" and report.opset == 17
    out = capsys.readouterr().out
    assert "dynamo exporter wrote opset 18, not 17" in out and "used the torchscript exporter instead" in out


def test_both_exporters_failing_is_exit_1(run, tmp_path, monkeypatch):
    def boom(model, args, opset):
        raise RuntimeError("unsupported op aten::frobnicate")

    monkeypatch.setattr(onnx_export, "_export_dynamo", boom)
    monkeypatch.setattr(onnx_export, "_export_torchscript", boom)
    with pytest.raises(ExportFailure, match="frobnicate"):
        export_checkpoint(run, tmp_path / "m.onnx", verbose=False)
    res = CliRunner().invoke(main, [str(run), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "export failed" in res.output and leftovers(tmp_path) == []


# --- bad input: one line, exit 2, nothing written --------------------------------------------


def _bad_checkpoints(root: Path) -> dict[str, tuple[Path, str]]:
    good = make_run(root, "good") / "checkpoint" / "ema.safetensors"
    data = good.read_bytes()
    cases = {}
    trunc = root / "truncated.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (trunc, "not a readable safetensors file")
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(4096))
    cases["corrupt"] = (corrupt, "not a readable safetensors file")
    plain = root / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(plain))
    cases["foreign"] = (plain, "no mdx.config metadata")
    model = ContextUnet(TINY)
    unknown = root / "unknown.safetensors"
    save_weights_file(unknown, model, tiny_config(format=99))
    cases["unknown format"] = (unknown, "unknown checkpoint format 99")
    odd = tiny_config()
    odd["model"] = {**odd["model"], "depth": 3}
    unknown_key = root / "unknown-key.safetensors"
    save_weights_file(unknown_key, model, odd)
    cases["unknown config key"] = (unknown_key, "unknown keys depth")
    mismatched = root / "mismatched.safetensors"
    save_weights_file(mismatched, model, tiny_config(ModelConfig(n_feat=24, n_classes=3, num_train_timesteps=T)))
    cases["mismatched"] = (mismatched, "weights do not match")
    cases["missing"] = (root / "nowhere", "no such file or folder")
    (root / "empty-run").mkdir()
    cases["no checkpoint"] = (root / "empty-run", "no checkpoint in this folder")
    return cases


def _assert_bad(res, needle: str, folder: Path) -> None:
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("mdx-export: error: ") and needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in res.output
    assert leftovers(folder) == []


def test_bad_checkpoints(tmp_path):
    cases = _bad_checkpoints(tmp_path / "ckpts")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, (path, needle) in cases.items():
        res = CliRunner().invoke(main, [str(path), "-o", str(out_dir / "m.onnx")])
        _assert_bad(res, needle, out_dir)


@pytest.mark.parametrize("args, needle", [
    (["--opset", "12"], "unsupported opset 12; the installed exporter supports 13.."),
    (["--opset", str(onnx_export.max_opset() + 1)], f"unsupported opset {onnx_export.max_opset() + 1}"),
    (["--recommended", "{nope"], "--recommended is not valid JSON"),
    (["--recommended", '{"sampler": "euler", "steps": 10, "guidance": 1}'], "sampler 'euler'"),
    (["--recommended", '{"sampler": "ddim", "steps": 0, "guidance": 1}'], "steps must be an integer in 1..50"),
    (["--recommended", '{"sampler": "ddim", "steps": 51, "guidance": 1}'], "steps must be an integer in 1..50"),
    (["--recommended", '{"sampler": "ddim", "steps": 5, "guidance": -1}'], "guidance must be a number >= 0"),
    (["--recommended", '{"sampler": "ddim", "steps": 5}'], "must have the keys"),
    (["--calibration-data", "emoji16"], "only used with --precision int8"),
    (["--int8-activations", "s4"], "Invalid value for '--int8-activations'"),
    (["--int8-scope", "half"], "Invalid value for '--int8-scope'"),
    (["--precision", "int8", "--calibration-data", "no/such/data"], "calibration data: no/such/data"),
])
def test_bad_options(run, tmp_path, args, needle):
    res = CliRunner().invoke(main, [str(run), "-o", str(tmp_path / "m.onnx"), *args])
    _assert_bad(res, needle, tmp_path)


def test_bad_output_paths(run, tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    for out, needle in [(tmp_path / "a-folder", "it is a folder"),
                        (tmp_path / "a-file" / "m.onnx", "a-file is not a folder")]:
        res = CliRunner().invoke(main, [str(run), "-o", str(out)])
        _assert_bad(res, needle, tmp_path)
    assert (tmp_path / "a-file").read_text() == "x" and not any((tmp_path / "a-folder").iterdir())


def test_parse_recommended_canonical():
    sched = make_schedule("cosine", 50)
    assert parse_recommended(None, sched) is None
    assert parse_recommended({"sampler": "ddpm", "steps": 50, "guidance": 0}, sched) == \
        {"sampler": "ddpm", "steps": 50, "guidance": 0.0}
    with pytest.raises(ExportError, match="1..50"):
        parse_recommended({"sampler": "ddpm", "steps": True, "guidance": 0}, sched)
    rec = {"sampler": "dpmpp", "steps": 20, "guidance": 2,
           "sampler_options": {"dpmpp": {"lambda_min_clipped": -3.0}, "ddim": {"clip_sample": False}}}
    assert parse_recommended(rec, sched)["sampler_options"] == rec["sampler_options"]
    for bad in ({"dpmpp": {"no_such_option": 1}}, {"dpmpp": [1]}, {"euler": {}}, [1]):
        with pytest.raises(ExportError, match="sampler_options"):
            parse_recommended({**rec, "sampler_options": bad}, sched)
    with pytest.raises(ExportError, match="keys"):
        parse_recommended({**rec, "extra": 1}, sched)


def test_help_text():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    for opt in ("-o, --output", "--opset", "--precision", "--weights", "--no-simplify", "--recommended",
                "--calibration-data"):
        assert opt in res.output


def test_default_output_names(run, tmp_path):
    assert onnx_export.default_output(run, "fp32") == Path("models/run-tiny.onnx")
    assert onnx_export.default_output(run / "checkpoint", "fp16") == Path("models/run-tiny-fp16.onnx")
    assert onnx_export.default_output(run / "checkpoint" / "ema.safetensors", "int8") == \
        Path("models/run-tiny-int8.onnx")
    loose = tmp_path / "mine.safetensors"
    loose.write_bytes(b"")
    assert onnx_export.default_output(loose, "fp32") == Path("models/mine.onnx")


def test_int8_scope_refusal_through_the_cli(run, tmp_path, monkeypatch):
    """A model with no context-free convolution: one line naming --int8-scope all, exit 2, no file."""
    from mdx.export import quantize
    monkeypatch.setattr(quantize, "int8_convs", lambda model, scope: ([], [n.name for n in model.graph.node
                                                                          if n.op_type in quantize.CONV_OPS]))
    res = CliRunner().invoke(main, [str(run), "-o", str(tmp_path / "m.onnx"), "--precision", "int8"])
    _assert_bad(res, "try --int8-scope all", tmp_path)
