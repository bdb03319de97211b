"""Tests for mdx.train.model: the branch-free ContextUnet and its config.

The network must export as one static graph (torch.export, strict), keep the sizes docs/contract.md
states for the default configuration, build every submodule in `__init__`, normalise the raw
timestep index inside, and reject a bad ModelConfig with a ValueError.
"""

from __future__ import annotations


import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mdx.train.model import ContextUnet, ModelConfig, count_parameters

# docs/contract.md: F = 64, K = 5, 16x16 RGB -> 1.48 M parameters and 0.30 GFLOP per image per forward.
DEFAULT_PARAMS = 1_481_027
DEFAULT_GFLOP = 0.30
GFLOP_RTOL = 0.02


def make_model(seed: int = 0, **overrides: int) -> ContextUnet:
    """A small ContextUnet in eval mode (n_feat 8, 3 classes, T 50 unless overridden)."""
    torch.manual_seed(seed)
    cfg = dict(in_channels=3, n_feat=8, n_classes=3, image_size=16, num_train_timesteps=50) | overrides
    return ContextUnet(ModelConfig(**cfg)).eval()


def make_inputs(model: ContextUnet, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample (B, C, H, W), timestep (B,) raw indices, context (B, K) one-hot) for `model`."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, cfg.num_train_timesteps, (batch,), generator=g).float()
    c = torch.nn.functional.one_hot(torch.arange(batch) % cfg.n_classes, cfg.n_classes).float()
    return x, t, c


# --- export: one static graph ------------------------------------------------------------


def test_torch_export_strict_with_dynamic_batch() -> None:
    """strict torch.export traces the whole forward (no graph breaks, no data-dependent branch)
    with a symbolic batch dimension, and the exported program computes what the module does."""
    model = make_model()
    args = make_inputs(model, batch=2)
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, args, strict=True,
                             dynamic_shapes={"sample": {0: batch}, "timestep": {0: batch}, "context": {0: batch}})
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    # The seed built a Conv2d inside forward, which showed up as a random-init op in the graph.
    assert not [op for op in ops if "rand" in op or "normal" in op or "uniform" in op], ops
    exported = ep.module()
    for b in (1, 5):
        inputs = make_inputs(model, batch=b, seed=b)
        with torch.no_grad():
            want = model(*inputs)
        got = exported(*inputs)
        assert got.shape == want.shape == inputs[0].shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_torch_export_strict_static() -> None:
    """The plain (static-shape) strict export succeeds too, for a 1-channel 32x32 config."""
    model = make_model(in_channels=1, image_size=32, n_classes=2)
    inputs = make_inputs(model, batch=1)
    ep = torch.export.export(model, inputs, strict=True)
    with torch.no_grad():
        want = model(*inputs)
    got = ep.module()(*inputs)
    assert got.shape == (1, 1, 32, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# --- shapes and sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [16, 32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n_classes", [1, 5, 9])
def test_output_shape(image_size: int, channels: int, n_classes: int) -> None:
    model = make_model(in_channels=channels, image_size=image_size, n_classes=n_classes)
    x, t, c = make_inputs(model, batch=3)
    with torch.no_grad():
        out = model(x, t, c)
    assert out.shape == (3, channels, image_size, image_size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_default_config_parameters_and_flops() -> None:
    """The course configuration: 1,481,027 parameters, 0.30 GFLOP per image (within 2 %)."""
    model = ContextUnet(ModelConfig(n_classes=5)).eval()  # F=64, 16x16 RGB, T=500
    assert count_parameters(model) == DEFAULT_PARAMS
    per_image = []
    for batch in (1, 4):
        x, t, c = make_inputs(model, batch=batch)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, c)
        per_image.append(counter.get_total_flops() / batch / 1e9)
    assert per_image[0] == pytest.approx(per_image[1], rel=1e-9)  # linear in the batch
    assert per_image[0] == pytest.approx(DEFAULT_GFLOP, rel=GFLOP_RTOL)


# --- structure: nothing built in forward ---------------------------------------------------


def _snapshot(model: torch.nn.Module) -> tuple[list[str], list[int], list[str]]:
    """Names of modules and state, and parameter identities: what a forward must not change."""
    return ([n for n, _ in model.named_modules()], [id(p) for p in model.parameters()], list(model.state_dict()))


def test_forward_creates_no_submodule_or_parameter() -> None:
    model = make_model()
    before = _snapshot(model)
    x, t, c = make_inputs(model, batch=2)
    model.train()
    model(x, t, c).sum().backward()  # a training forward (BatchNorm updates its buffers in place)
    model.eval()
    with torch.no_grad():
        model(x, t, c)
    assert _snapshot(model) == before
    # A fresh model of the same config has exactly the same state keys, shapes and dtypes.
    fresh = make_model(seed=1)
    assert {k: (v.shape, v.dtype) for k, v in fresh.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}


def test_residual_shortcut_built_in_init() -> None:
    """init_conv maps C -> F channels: its 1x1 shortcut conv is a registered submodule."""
    model = make_model(in_channels=3, n_feat=16)
    shortcut = model.init_conv.shortcut
    assert isinstance(shortcut, torch.nn.Conv2d)
    assert (shortcut.in_channels, shortcut.out_channels, shortcut.kernel_size) == (3, 16, (1, 1))
    assert "init_conv.shortcut.weight" in model.state_dict()


# --- the timestep is normalised inside ----------------------------------------------------


def test_timestep_normalised_inside() -> None:
    """model(x, t, c) equals the forward written out by hand with the time embeddings fed t/T."""
    model = make_model(num_train_timesteps=50)
    x, _, c = make_inputs(model, batch=4)
    t = torch.tensor([0.0, 1.0, 25.0, 49.0])
    F = model.config.n_feat
    with torch.no_grad():
        tn = (t / 50.0).reshape(-1, 1)  # (B, 1) in [0, 1)
        h0 = model.init_conv(x)
        d1 = model.down1(h0)
        d2 = model.down2(d1)
        u1 = model.up0(model.to_vec(d2))
        cemb1 = model.contextembed1(c).reshape(-1, 2 * F, 1, 1)
        temb1 = model.timeembed1(tn).reshape(-1, 2 * F, 1, 1)
        cemb2 = model.contextembed2(c).reshape(-1, F, 1, 1)
        temb2 = model.timeembed2(tn).reshape(-1, F, 1, 1)
        u2 = model.up1(cemb1 * u1 + temb1, d2)
        u3 = model.up2(cemb2 * u2 + temb2, d1)
        want = model.out(torch.cat((u3, h0), 1))
        got = model(x, t, c)
        # An integer timestep tensor is accepted and means the same.
        got_int = model(x, t.long(), c)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_int, got, rtol=0, atol=0)


def test_output_depends_on_timestep_deterministically() -> None:
    model = make_model()
    x, _, c = make_inputs(model, batch=2)
    with torch.no_grad():
        a = model(x, torch.tensor([10.0, 10.0]), c)
        b = model(x, torch.tensor([10.0, 10.0]), c)
        d = model(x, torch.tensor([40.0, 40.0]), c)
    assert torch.equal(a, b)
    assert (a - d).abs().max() > 1e-4


# --- config validation -------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("in_channels", 0, "in_channels"),
    ("n_feat", -8, "n_feat"),
    ("n_feat", 12, "divisible by 8"),
    ("n_classes", 0, "n_classes"),
    ("image_size", 18, "divisible by 4"),
    ("image_size", 16.0, "image_size"),
    ("num_train_timesteps", True, "num_train_timesteps"),
    ("num_train_timesteps", 0, "num_train_timesteps"),
])
def test_bad_model_config_raises(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ModelConfig(**{field: value})


def test_model_config_round_trip_and_unknown_keys() -> None:
    cfg = ModelConfig(in_channels=1, n_feat=16, n_classes=4, image_size=32, num_train_timesteps=100)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys bogus"):
        ModelConfig.from_dict(cfg.to_dict() | {"bogus": 1})
