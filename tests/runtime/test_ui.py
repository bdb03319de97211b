"""mdx-ui: the app launched in the test process and driven with gradio_client, its handler
called directly, the model folder scan, the command line, and the layering (no torch)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# gradio 6.31's queue calls pandas APIs that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
onnx = pytest.importorskip("onnx")

import runtime_helpers as h  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mdx.runtime import ui  # noqa: E402
from mdx.runtime.pipeline import PipelineError  # noqa: E402
from mdx.runtime.schedules import Schedule  # noqa: E402
from mdx.runtime.session import ModelError  # noqa: E402

CLASSES = ("apple", "ball", "cat")
SCHEDULE = {"kind": "linear", "num_train_timesteps": 50, "beta_start": 1e-4, "beta_end": 0.02}
MAX_BATCH = 6
RECOMMENDED = {"sampler": "dpmpp", "steps": 7, "guidance": 2.0}
GOOD = dict(model="tiny.onnx", classes=["apple"], sampler="ddim", steps=3, guidance=1.0, eta=0.0, seed=0,
            batch=2, provider="auto")


def class_images(size: int = 16) -> np.ndarray:
    """(3, 3, size, size) in [-1, 1] on white: a red disc (apple), a blue square (ball), green
    stripes (cat)."""
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1  # (H, W) in [-1, 1]
    shapes = [xx**2 + yy**2 < 0.5, (abs(xx) < 0.6) & (abs(yy) < 0.6), (np.floor((xx + 1) * 3) % 2) == 0]
    colours = [(1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0)]
    images = np.ones((len(shapes), 3, size, size), dtype=np.float32)
    for image, shape, colour in zip(images, shapes, colours):
        image[:, shape] = np.array(colour, dtype=np.float32)[:, None]
    return images


def write_contract_model(path: Path, *, recommended: dict | None = None, size: int = 16) -> Path:
    """A contract model (docs/contract.md) without torch: the exact denoiser for data that is one
    image per class. x_0 = context @ images (a mix adds them, all-zero context gives grey), and
    eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), so every sampler lands on the class image."""
    from onnx import TensorProto, helper, numpy_helper

    abar = Schedule.from_dict(SCHEDULE).alphas_cumprod
    consts = {
        "sqrt_abar": np.sqrt(abar).astype(np.float32),  # (T,)
        "sqrt_one_minus_abar": np.sqrt(1 - abar).astype(np.float32),  # (T,)
        "images": class_images(size).reshape(len(CLASSES), -1),  # (K, C*H*W)
        "shape_b111": np.array([-1, 1, 1, 1], dtype=np.int64),
        "shape_bchw": np.array([-1, 3, size, size], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Cast", ["timestep"], ["t"], to=TensorProto.INT64),
        helper.make_node("Gather", ["sqrt_abar", "t"], ["a"]),
        helper.make_node("Gather", ["sqrt_one_minus_abar", "t"], ["s"]),
        helper.make_node("Reshape", ["a", "shape_b111"], ["a4"]),
        helper.make_node("Reshape", ["s", "shape_b111"], ["s4"]),
        helper.make_node("MatMul", ["context", "images"], ["x0_flat"]),
        helper.make_node("Reshape", ["x0_flat", "shape_bchw"], ["x0"]),
        helper.make_node("Mul", ["a4", "x0"], ["signal"]),
        helper.make_node("Sub", ["sample", "signal"], ["noise"]),
        helper.make_node("Div", ["noise", "s4"], ["model_output"]),
    ]
    graph = helper.make_graph(
        nodes, "class_images",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 3, size, size]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", len(CLASSES)])],
        [helper.make_tensor_value_info("model_output", TensorProto.FLOAT, ["batch", 3, size, size])],
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"mdx.format": "1", "mdx.image_size": str(size), "mdx.channels": "3",
            "mdx.classes": json.dumps(list(CLASSES)), "mdx.schedule": json.dumps(SCHEDULE),
            "mdx.prediction_type": "epsilon", "mdx.precision": "fp32"}
    if recommended is not None:
        meta["mdx.recommended"] = json.dumps(recommended)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return Path(path)


def write_classifier(path: Path) -> Path:
    """A valid ONNX model with classifier metadata but no mdx.format, like
    models/emoji16-classifier.onnx."""
    model = onnx.load(str(h.write_wrong_signature_model(path)))
    for key, value in {"mdx.classifier.format": "1", "mdx.classes": json.dumps(list(CLASSES))}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return Path(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models_dir(root: Path) -> Path:
    """tiny.onnx, rec.onnx (with mdx.recommended), broken.onnx (not ONNX), classifier.onnx
    (valid ONNX without mdx metadata, which the picker leaves out) and a text file."""
    models = root / "models"
    models.mkdir()
    write_contract_model(models / "tiny.onnx")
    write_contract_model(models / "rec.onnx", recommended=RECOMMENDED)
    (models / "broken.onnx").write_bytes(b"this is not an onnx model\n" * 20)
    write_classifier(models / "classifier.onnx")
    (models / "notes.txt").write_text("not a model")
    return models


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return make_models_dir(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def studio(models_dir):
    return ui.Studio(models_dir, max_batch=MAX_BATCH)


@pytest.fixture(scope="module")
def server(studio):
    app = ui.build_app(studio.models_dir, studio=studio, concurrency=2)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[1], verbose=False)


def predict(client, **changes):
    values = {**GOOD, **changes}
    return client.predict(*values.values(), api_name="/generate")


# --- the models folder ----------------------------------------------------------------


def test_picker_lists_diffusion_models_only(models_dir):
    # classifier.onnx parses as ONNX but has no mdx.format; broken.onnx does not parse and
    # stays listed so that picking it shows the error.
    assert ui.list_models(models_dir) == ["broken.onnx", "rec.onnx", "tiny.onnx"]
    assert ui.list_models(models_dir / "missing") == []


def test_read_metadata_without_a_session(models_dir):
    meta = ui.read_metadata(models_dir / "rec.onnx")
    assert meta["mdx.format"] == "1" and json.loads(meta["mdx.recommended"]) == RECOMMENDED
    assert json.loads(meta["mdx.classes"]) == list(CLASSES)
    assert ui.read_metadata(models_dir / "classifier.onnx") == {"mdx.classifier.format": "1",
                                                               "mdx.classes": json.dumps(list(CLASSES))}
    for bad in ("broken.onnx", "notes.txt"):
        with pytest.raises(ValueError):
            ui.read_metadata(models_dir / bad)


def test_the_shipped_classifier_is_not_offered():
    import onnxruntime as ort

    classifier = Path(ui.__file__).resolve().parents[1] / "models" / "emoji16-classifier.onnx"
    if not classifier.is_file():
        pytest.skip(f"{classifier} is not there")
    session = ort.InferenceSession(str(classifier), providers=["CPUExecutionProvider"])
    assert ui.read_metadata(classifier) == session.get_modelmeta().custom_metadata_map
    assert classifier.name not in ui.list_models(classifier.parent)


def test_provider_choices_are_what_the_handler_accepts(studio):
    choices = ui.provider_choices()
    assert choices[0] == "auto" and "CPUExecutionProvider" in choices and len(set(choices)) == len(choices)
    assert [studio.check_provider(c) for c in choices] == choices
    with pytest.raises(ui.UiError, match="'TPUExecutionProvider' is not one of auto"):
        studio.check_provider("TPUExecutionProvider")
    for provider in ("auto", "CPUExecutionProvider"):  # these two run everywhere
        assert studio.view("tiny.onnx", provider).info.class_names == tuple(CLASSES)


def test_view_gives_classes_and_recommended_defaults(studio):
    view = studio.view("rec.onnx")
    assert view.info.class_names == tuple(list(CLASSES))
    assert view.settings == RECOMMENDED
    plain = studio.view("tiny.onnx")
    assert plain.settings == {"sampler": "ddim", "steps": 25, "guidance": 1.0}  # mdx-sample's fallback


def test_unusable_recommendations_fall_back_with_a_note(tmp_path):
    write_contract_model(tmp_path / "odd.onnx", recommended={"sampler": "euler", "steps": "many", "guidance": -1})
    write_contract_model(tmp_path / "dpm.onnx", recommended={"sampler": "dpmpp", "steps": 50, "guidance": 3})
    odd = ui.Studio(tmp_path).view("odd.onnx")
    assert odd.settings == {"sampler": "ddim", "steps": 25, "guidance": 1.0}
    assert [n.split(" ignored")[0] for n in odd.notes] == [
        "mdx.recommended sampler 'euler'", "mdx.recommended steps 'many'", "mdx.recommended guidance -1"]
    assert "⚠️ mdx.recommended sampler 'euler' ignored" in ui.describe(odd)
    dpm = ui.Studio(tmp_path).view("dpm.onnx")  # DPM-Solver++ takes at most T - 1 = 49 steps
    assert dpm.settings == {"sampler": "dpmpp", "steps": 25, "guidance": 3.0}
    assert dpm.notes == ("mdx.recommended steps 50 ignored: not an integer in 1..49",)


def test_requests_share_one_engine_per_model_and_provider(studio):
    """Concurrent users submit to the same batching engine; each gets mdx-sample's images."""
    from concurrent.futures import ThreadPoolExecutor

    from mdx.runtime.images import grid_columns, make_grid, to_uint8
    from mdx.runtime.pipeline import build_context, generate
    from mdx.runtime.session import OnnxDenoiser

    path = studio.models_dir / "tiny.onnx"
    engine = studio.engines.engine_for(path, "auto")
    assert studio.engines.engine_for(path, "auto") is engine
    before = engine.stats().requests["ok"]
    settings = [{**GOOD, "seed": seed, "sampler": "ddpm", "steps": 20, "guidance": 3.0} for seed in range(3)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda s: studio.generate(**s), settings))
    assert engine.stats().requests["ok"] == before + 3
    alone = OnnxDenoiser.load(path)
    for s, r in zip(settings, results):
        context, _ = build_context(alone.info.class_names, s["classes"], False, s["batch"])
        want = generate(alone, sampler="ddpm", steps=20, context=context, guidance=3.0, seed=s["seed"]).samples
        grid = make_grid(to_uint8(want), grid_columns(s["batch"]), ui.GRID_PIXELS // 16)
        assert np.array_equal(r.grid, grid)


# --- the app through gradio_client ----------------------------------------------------


def test_generate_returns_grid_animation_and_timings(client, models_dir):
    grid_path, gif_path, timings = predict(client, batch=4, classes=["apple", "cat"])
    grid = Image.open(grid_path)
    assert grid.format == "PNG" and grid.size[0] > 16 * 2  # 2 x 2 images, upscaled
    gif = Image.open(gif_path)
    # One frame per step, then the samples (PIL merges a repeated last frame into one).
    assert gif.format == "GIF" and 3 <= gif.n_frames <= 3 + 1
    assert timings.startswith("4 images of 16×16 (apple+cat, ddim 3 steps, guidance 1, seed 0)")
    assert "images/s" in timings and "in the model" in timings
    assert h.auto_provider(models_dir / "tiny.onnx") in timings  # the provider that really ran


def test_the_ticked_class_is_what_is_drawn(client):
    # The test model's exact denoiser lands on the class image: a blue square for "ball".
    grid = np.asarray(Image.open(predict(client, classes=["ball"], steps=10, batch=1)[0]).convert("RGB"))
    target = ui.make_grid(ui.to_uint8(class_images()[1:2]), 1, ui.GRID_PIXELS // 16)
    assert grid.shape == target.shape
    assert np.abs(grid.astype(int) - target).max() <= 2


@pytest.mark.parametrize("changes, message", [
    (dict(steps=51), "steps"),  # more than T = 50: the handler (the bound depends on the model)
    (dict(sampler="dpmpp", steps=50), "1..49"),
    (dict(steps=0), "minimum"),  # the API's steps input
    (dict(batch=MAX_BATCH + 1), "maximum"),  # the batch slider
    (dict(batch=0), "minimum"),
    (dict(guidance=ui.MAX_GUIDANCE + 1), "maximum"),  # the guidance slider
    (dict(guidance=-0.5), "minimum"),
    (dict(eta=1.5), "maximum"),
    (dict(seed=-1), "minimum"),
    (dict(sampler="euler"), "euler"),
    (dict(classes=["dog"]), "unknown class 'dog'"),
    (dict(provider="NoSuchExecutionProvider"), "NoSuchExecutionProvider"),
    (dict(model="../tiny.onnx"), "not in"),
])
def test_out_of_range_values_are_refused(client, changes, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=message.replace(".", r"\.")):
        predict(client, **changes)


def test_corrupt_model_is_an_error_and_the_server_keeps_serving(client, models_dir):
    with pytest.raises(gradio_client.exceptions.AppError, match="broken.onnx.*not an ONNX model"):
        predict(client, model="broken.onnx")
    (models_dir / "gone.onnx").write_bytes((models_dir / "tiny.onnx").read_bytes())
    try:
        listed = ui.list_models(models_dir)
        assert "gone.onnx" in listed
    finally:
        (models_dir / "gone.onnx").unlink()
    with pytest.raises(gradio_client.exceptions.AppError, match="gone.onnx"):  # listed, then deleted
        predict(client, model="gone.onnx")
    grid_path, _, timings = predict(client)
    assert Image.open(grid_path).format == "PNG" and "2 images" in timings


def test_concurrent_requests_both_finish(client):
    jobs = [client.submit(*{**GOOD, "seed": seed, "batch": 3}.values(), api_name="/generate") for seed in (1, 2)]
    for job in jobs:
        assert job.result(timeout=60)[2].startswith("3 images")


def test_pick_model_updates_classes_and_defaults(client):
    classes, card, sampler, steps, guidance, eta = client.predict("rec.onnx", "auto", api_name="/pick_model")
    assert card.startswith("**rec.onnx**") and "T = 50" in card
    assert classes["choices"] == [[c, c] for c in list(CLASSES)] and classes["value"] == []
    assert (sampler["value"], steps["value"], guidance["value"]) == ("dpmpp", 7, 2.0)
    assert steps["maximum"] == 49 and eta["interactive"] is False  # DPM-Solver++: T - 1 steps, no eta
    _, card, *_ = client.predict("broken.onnx", "auto", api_name="/pick_model")
    assert "not an ONNX model" in card


def test_the_page_components_are_bounded(server):
    app, _ = server
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert (by_id["batch"].minimum, by_id["batch"].maximum) == (1, MAX_BATCH)
    # The first model that loads is rec.onnx, which recommends dpmpp: at most T - 1 = 49 steps.
    assert (by_id["steps"].minimum, by_id["steps"].maximum) == (1, 49)
    assert (by_id["guidance"].minimum, by_id["guidance"].maximum) == (0, ui.MAX_GUIDANCE)
    assert list(by_id["classes"].choices) == [(c, c) for c in list(CLASSES)]
    assert by_id["model"].value == "rec.onnx"  # broken.onnx sorts first but does not load
    for component, bad in ((by_id["steps"], 51), (by_id["batch"], MAX_BATCH + 1), (by_id["guidance"], -1)):
        with pytest.raises(gr.Error):
            component.preprocess(bad)
    with pytest.raises(gr.Error):
        by_id["classes"].preprocess(["dog"])


def test_queue_has_the_concurrency_limit(server):
    app, _ = server
    assert app._queue.default_concurrency_limit == 2


# --- the handler itself (the second line of defence) ----------------------------------


@pytest.mark.parametrize("changes, error, message", [
    (dict(steps=51), ui.UiError, r"steps .* 1\.\.50, got 51"),
    (dict(steps=2.5), ui.UiError, "steps"),
    (dict(steps=True), ui.UiError, "steps"),
    (dict(batch=MAX_BATCH + 1), ui.UiError, rf"batch size must be an integer in 1\.\.{MAX_BATCH}"),
    (dict(batch=0), ui.UiError, "batch size"),
    (dict(guidance=ui.MAX_GUIDANCE + 0.1), ui.UiError, "guidance"),
    (dict(guidance=float("nan")), ui.UiError, "guidance"),
    (dict(guidance="2"), ui.UiError, "guidance"),
    (dict(eta=-0.1), ui.UiError, "eta"),
    (dict(seed=ui.MAX_SEED + 1), ui.UiError, "seed"),
    (dict(sampler="euler"), ui.UiError, "sampler 'euler'"),
    (dict(classes="apple"), ui.UiError, "list of class names"),
    (dict(classes=["dog"]), PipelineError, "unknown class"),
    (dict(model="/etc/passwd"), ui.UiError, "not in"),
    (dict(model=None), ui.UiError, "not in"),
    (dict(provider="cuda"), ui.UiError, "provider 'cuda'"),
    (dict(model="broken.onnx"), ModelError, "not an ONNX model"),
])
def test_handler_refuses_bad_values(studio, changes, error, message):
    with pytest.raises(error, match=message):
        studio.generate(**{**GOOD, **changes})


def test_handler_generates(studio):
    calls = []
    result = studio.generate(**{**GOOD, "batch": 3, "classes": [], "steps": 2},
                             progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 2), (2, 2)]
    assert result.labels.tolist() == [0, 1, 2]  # no class ticked: one class per column
    assert result.grid.dtype == np.uint8 and result.grid.shape[2] == 3
    assert result.animation.suffix == ".gif" and result.animation.is_file()


def test_empty_models_folder_builds_and_explains(tmp_path):
    studio = ui.Studio(tmp_path, max_batch=2)
    app = ui.build_app(tmp_path, studio=studio)
    cards = [b.value for b in app.blocks.values() if getattr(b, "elem_id", None) == "model-card"]
    assert "No models" in cards[0]
    with pytest.raises(ui.UiError, match="no models"):
        studio.generate(**GOOD)


# --- the command line -----------------------------------------------------------------


def test_help_lists_the_options():
    result = CliRunner().invoke(ui.main, ["--help"])
    assert result.exit_code == 0
    for option in ("--models-dir", "--host", "--port", "--share", "--max-batch", "--concurrency"):
        assert option in result.output


def test_binds_localhost_without_share_by_default(models_dir, monkeypatch):
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw, app=self) or (None, "url", None))
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    result = CliRunner().invoke(ui.main, ["--models-dir", str(models_dir), "--concurrency", "3"])
    assert result.exit_code == 0, result.output
    assert (seen["server_name"], seen["server_port"], seen["share"]) == ("127.0.0.1", 7860, False)
    assert seen["app"]._queue.default_concurrency_limit == 3
    assert "3 model(s)" in result.output and "serving on url" in result.output


def test_cli_errors_are_one_line_and_exit_2(tmp_path, monkeypatch):
    result = CliRunner().invoke(ui.main, ["--models-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "mdx-ui: error: models folder" in result.output
    assert CliRunner().invoke(ui.main, ["--max-batch", "0"]).exit_code == 2
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    result = CliRunner().invoke(ui.main, ["--models-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "pip install 'microdiffusion[ui]'" in result.output


# --- layering -------------------------------------------------------------------------


def test_ui_imports_only_the_runtime_and_gradio():
    """Every import in ui.py, at module level or inside functions: the runtime's own
    dependencies, the standard library and (lazily) gradio; never torch, mdx.train, mdx.export."""
    import ast

    tree = ast.parse(Path(ui.__file__).read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0]
    allowed = {"numpy", "onnxruntime", "click", "gradio", "__future__"} | set(sys.stdlib_module_names)
    bad = [n for n in names if n.split(".")[0] not in allowed and not n.startswith("mdx.runtime") and n != "mdx.runtime"]
    assert bad == []
    lazy = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
            and any(alias.name.startswith("gradio") for alias in node.names)]
    assert lazy == []  # gradio only inside functions


def test_ui_samples_without_torch(models_dir):
    """In a fresh interpreter where torch, mdx.train and mdx.export cannot be imported."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch" or name.startswith(("mdx.train", "mdx.export")):
                    raise ImportError("blocked: " + name)

        sys.meta_path.insert(0, Block())
        from mdx.runtime import ui
        r = ui.Studio({str(models_dir)!r}, max_batch=2).generate("tiny.onnx", ["ball"], "ddim", 2, 1.0, 0.0, 0,
                                                                  1, "auto")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith(("mdx.train", "mdx.export")))
        print("OK", r.grid.shape, loaded)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("[]"), proc.stdout
