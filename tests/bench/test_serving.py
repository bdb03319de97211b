"""The serving benchmark: it runs end to end on a tiny model for a fraction of a second per load
(in process and over HTTP), its records follow the schema, and the report's arithmetic (pairs,
speed-up, the target line) is right. No speed is asserted."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import runtime_helpers as h
from mdx.bench import serving
from mdx.bench.records import check_record

CPU = "CPUExecutionProvider"


@pytest.fixture(scope="module")
def tiny():
    return h.cached_tiny()[1]


def test_runs_engine_and_one_at_a_time_side_by_side(tiny):
    records = serving.run_serving(tiny, quick=True, providers=["cpu"], clients=(1, 3), images=(1, 2), seconds=0.2,
                                  threads=1, max_rows=8, log=lambda m: None)
    assert len(records) == 8  # 2 modes x 2 clients x 2 image counts
    for rec in records:
        assert check_record(rec) == [], rec
        assert rec["requests"] >= 1 and not rec["errors"] and rec["provider"] == CPU
        assert rec["images_per_s"] == pytest.approx(rec["requests"] * rec["request_images"] / rec["wall_s"])
    engine = [r for r in records if r["mode"] == "engine" and r["clients"] == 3 and r["request_images"] == 2]
    assert engine[0]["mean_rows_per_call"] > 2  # three clients' requests shared calls
    serial = [r for r in records if r["mode"] == "one-at-a-time"]
    assert all(r["mean_rows_per_call"] == r["request_images"] for r in serial)  # guidance 1: one row per image
    table = serving.markdown(records)
    assert table.count("\n| CPU |") == 4


def test_http_mode(tiny):
    records = serving.run_serving(tiny, quick=True, providers=[CPU], clients=(2,), images=(1,), seconds=0.2,
                                  threads=1, max_rows=8, http=True, log=lambda m: None)
    modes = {r["mode"]: r for r in records}
    assert set(modes) == {"engine-http", "one-at-a-time"} and modes["engine-http"]["requests"] >= 1
    assert not modes["engine-http"]["errors"]


def _rec(mode, clients, images_per_s, p50, p99, images=1, provider=CPU):
    return {"mode": mode, "provider": provider, "clients": clients, "request_images": images,
            "images_per_s": images_per_s, "requests_per_s": images_per_s, "p50_s": p50, "p99_s": p99,
            "mean_rows_per_call": 2.0}


def test_target_line_arithmetic():
    records = [_rec("engine", 1, 10.0, 0.1, 0.1), _rec("one-at-a-time", 1, 10.0, 0.1, 0.1),
               _rec("engine", 32, 30.0, 0.2, 0.25), _rec("one-at-a-time", 32, 10.0, 3.0, 3.3)]
    line = serving.target_line(records, CPU)
    assert "3.00x the one-at-a-time throughput" in line and "2.50x the single-client latency" in line
    assert line.endswith(": met")
    records[2]["p99_s"] = 0.5
    assert serving.target_line(records, CPU).endswith("not met")
    assert serving.target_line(records[:2], CPU) is None  # no 32-client load measured
    assert "3.00x |" in serving.markdown(records)


def test_cli_writes_results_and_rejects_bad_lists(tiny, tmp_path):
    command = serving._command()
    out = tmp_path / "out"
    r = CliRunner().invoke(command, ["--model", str(tiny), "--duration", "0.2", "--clients", "2", "--images", "1",
                                     "--providers", "cpu", "--threads", "1", "--max-rows", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "serving.json").read_text())
    assert len(doc["records"]) == 2 and "| CPU | 1 | 2 |" in (out / "serving.md").read_text()
    for bad in (["--clients", "0"], ["--clients", "a,b"], ["--images", ""]):
        r = CliRunner().invoke(command, ["--model", str(tiny), *bad])
        assert r.exit_code == 2 and "comma-separated positive integers" in r.output
    r = CliRunner().invoke(command, ["--model", str(tmp_path / "missing.onnx")])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_loads_past_the_budget_are_skipped_records(tiny):
    from mdx.bench.timing import Budget

    records = serving.run_serving(tiny, quick=True, providers=["cpu"], clients=(1, 2), images=(1,), seconds=0.2,
                                  threads=1, max_rows=4, budget=Budget(0.0), log=lambda m: None)
    assert len(records) == 4 and all("time budget" in r["skipped"] and check_record(r) == [] for r in records)
    assert "- skipped: CPUExecutionProvider engine 1x1: time budget" in serving.markdown(records)
