"""The model contract module: the metadata the test models carry, the metadata reader, and the
one resolution of a model's settings (the user's value, else mdx.recommended, else FALLBACK)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import runtime_helpers as h
from mdx.runtime import contract
from mdx.runtime.schedules import Schedule

REPO = Path(__file__).resolve().parents[2]


def _info(recommended=None, T=50) -> contract.ModelInfo:
    return contract.ModelInfo(image_size=16, channels=3, class_names=("a", "b"),
                              schedule=Schedule.from_dict({"kind": "linear", "num_train_timesteps": T, "beta_start": 1e-4, "beta_end": 0.02}),
                              prediction_type="epsilon", precision="fp32", recommended=recommended, path=Path("m"))


def test_tiny_test_models_carry_what_the_exporter_requires():
    _, path = h.cached_tiny()
    meta = contract.read_metadata(path)
    assert set(contract.REQUIRED_METADATA) <= set(meta)
    assert meta[contract.FORMAT] == contract.FORMAT_VERSION
    assert int(meta[contract.NUM_TRAIN_TIMESTEPS]) == json.loads(meta[contract.SCHEDULE])["num_train_timesteps"]


def test_the_exporter_requires_the_contract_keys():
    validate = pytest.importorskip("mdx.export.validate")
    assert validate.REQUIRED_METADATA is contract.REQUIRED_METADATA


def test_read_metadata_matches_onnxruntime_on_the_shipped_model():
    ort = pytest.importorskip("onnxruntime")
    shipped = REPO / "models" / "emoji16.onnx"
    if not shipped.exists():
        pytest.skip("models/emoji16.onnx is not in this checkout")
    session = ort.InferenceSession(str(shipped), providers=["CPUExecutionProvider"])
    assert contract.read_metadata(shipped) == session.get_modelmeta().custom_metadata_map


def test_model_metadata_strings_and_bad_values():
    kw = dict(image_size=16, channels=3, class_names=["a", "b"], prediction_type="epsilon", precision="int8",
              schedule={"kind": "cosine", "num_train_timesteps": 500, "beta_start": 1e-4, "beta_end": 0.02},
              train_config={"b": 1, "a": 2}, checkpoint_sha256="f" * 64, parameters=1234)
    meta = contract.model_metadata(**kw, recommended={"steps": 20, "sampler": "dpmpp", "guidance": 5.0})
    assert all(isinstance(v, str) for v in meta.values())
    assert meta[contract.NUM_TRAIN_TIMESTEPS] == "500" and meta[contract.PARAMETERS] == "1234"
    assert meta[contract.TRAIN_CONFIG] == '{"a": 2, "b": 1}'  # sorted keys: the same config, the same bytes
    assert json.loads(meta[contract.RECOMMENDED])["sampler"] == "dpmpp"
    assert contract.RECOMMENDED not in contract.model_metadata(**kw)
    with pytest.raises(ValueError, match="precision 'int4'"):
        contract.model_metadata(**{**kw, "precision": "int4"})
    with pytest.raises(ValueError, match="prediction type 'x0'"):
        contract.model_metadata(**{**kw, "prediction_type": "x0"})


def test_metadata_round_trips_through_parse_model_info():
    meta = contract.model_metadata(image_size=8, channels=1, class_names=["x", "y", "z"], prediction_type="v_prediction",
                                   precision="fp16", schedule={"kind": "linear", "num_train_timesteps": 30, "beta_start": 1e-4, "beta_end": 0.02},
                                   train_config={}, checkpoint_sha256="0" * 64, parameters=1,
                                   recommended={"sampler": "ddpm", "steps": 30, "guidance": 2.0})
    info = contract.parse_model_info(meta, Path("m.onnx"), sample_shape=["batch", 1, 8, 8], context_shape=["batch", 3])
    assert (info.image_size, info.channels, info.class_names) == (8, 1, ("x", "y", "z"))
    assert (info.prediction_type, info.precision, info.schedule.num_train_timesteps) == ("v_prediction", "fp16", 30)
    with pytest.raises(contract.ModelError, match="the graph's inputs fix it at 16"):
        contract.parse_model_info(meta, Path("m.onnx"), sample_shape=["batch", 1, 16, 16], context_shape=["b", 3])


def test_settings_without_recommendation_are_the_fallback():
    s = contract.resolve_settings(_info())
    assert s.as_dict() == contract.FALLBACK and s.sampler_options == {} and s.notes == ()
    assert contract.resolve_settings(_info(T=10)).steps == 10  # the fallback's 25 steps, capped at T


def test_settings_take_the_recommendation_and_the_user_wins():
    rec = {"sampler": "dpmpp", "steps": 20, "guidance": 5.0, "sampler_options": {"dpmpp": {"lambda_min_clipped": -3.0}}}
    s = contract.resolve_settings(_info(rec))
    assert (s.sampler, s.steps, s.guidance, s.sampler_options) == ("dpmpp", 20, 5.0, {"lambda_min_clipped": -3.0})
    user = contract.resolve_settings(_info(rec), sampler="ddim", steps=3, guidance=1.0)
    assert (user.sampler, user.steps, user.guidance, user.sampler_options) == ("ddim", 3, 1.0, {})
    mixed = contract.resolve_settings(_info(rec), guidance=0.0, sampler_options={"solver_order": 1})
    assert (mixed.sampler, mixed.steps, mixed.guidance, mixed.sampler_options) == ("dpmpp", 20, 0.0, {"solver_order": 1})


def test_unusable_recommended_values_are_skipped_with_notes():
    s = contract.resolve_settings(_info({"sampler": "euler", "steps": True, "guidance": float("nan")}))
    assert s.as_dict() == contract.FALLBACK
    assert [n.split(" ignored")[0] for n in s.notes] == [
        "mdx.recommended sampler 'euler'", "mdx.recommended steps True", "mdx.recommended guidance nan"]
    # DPM-Solver++ takes at most T - 1 steps; the page bounds guidance by its slider
    s = contract.resolve_settings(_info({"sampler": "dpmpp", "steps": 50, "guidance": 30}), max_guidance=20)
    assert (s.sampler, s.steps, s.guidance) == ("dpmpp", 25, 1.0)
    assert s.notes == ("mdx.recommended steps 50 ignored: not an integer in 1..49",
                       "mdx.recommended guidance 30 ignored: not a number in 0..20")


def test_model_info_is_the_same_class_everywhere():
    from mdx.runtime import session

    assert session.ModelInfo is contract.ModelInfo and session.ModelError is contract.ModelError
    info = dataclasses.replace(_info(), class_names=("a", "b", "c"))
    assert info.num_classes == 3 and info.sample_shape == (3, 16, 16)
