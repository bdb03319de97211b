"""The batching engine: same images as generate() whatever shares the batches, bounds
(max rows, queue, timeout), cancellation, errors, shutdown, and asyncio use.

Parity runs on a tiny exported ContextUnet on the fp32 CPU provider; the scheduling tests use
a numpy stand-in denoiser whose calls can be slowed, gated, failed and inspected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import runtime_helpers as h
from mdx.runtime.engine import (Engine, EngineClosed, EngineConfig, EngineError, QueueFull, RequestTimeout,
                                RequestTooLarge, SampleRequest, bucket_sizes)
from mdx.runtime.pipeline import PipelineError, build_context, generate
from mdx.runtime.samplers import SamplerError
from mdx.runtime.schedules import Schedule
from mdx.runtime.session import ModelInfo, OnnxDenoiser

CPU = "CPUExecutionProvider"


# --- a numpy stand-in for OnnxDenoiser -------------------------------------------------


class FakeBinding:
    def __init__(self, owner: "FakeDenoiser", batch: int) -> None:
        info = owner.info
        self.owner, self.batch = owner, batch
        self.sample = np.zeros((batch, *info.sample_shape), np.float32)
        self.timestep = np.zeros((batch,), np.float32)
        self.context = np.zeros((batch, info.num_classes), np.float32)
        self.out = np.zeros_like(self.sample)

    def run(self) -> np.ndarray:
        owner = self.owner
        owner.calls.append((self.batch, self.timestep.copy(), self.context.copy(), self.sample.copy()))
        if owner.gate is not None:
            owner.gate.wait(10)
        if owner.delay:
            time.sleep(owner.delay)
        if owner.fail_next:
            owner.fail_next = False
            raise RuntimeError("the provider failed")
        np.multiply(self.sample, np.float32(0.1), out=self.out)  # a linear "eps"
        return self.out


class FakeDenoiser:
    """info, provider, binding(batch) cached per batch as OnnxDenoiser does; records every call."""

    MAX_BINDINGS = 8

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.info = ModelInfo(image_size=4, channels=1, class_names=("a", "b"), schedule=Schedule(num_train_timesteps=20),
                              prediction_type="epsilon", precision="fp32", recommended=None, path=Path("fake.onnx"))
        self.provider = "fake"
        self.delay, self.gate, self.fail_next = delay, gate, False
        self.calls: list = []
        self.created: list[int] = []
        self._bindings: dict[int, FakeBinding] = {}

    def binding(self, batch: int) -> FakeBinding:
        if batch not in self._bindings:
            self.created.append(batch)
            self._bindings[batch] = FakeBinding(self, batch)
        return self._bindings[batch]


def fake_request(n: int = 1, steps: int = 5, **kw) -> SampleRequest:
    context = np.zeros((n, 2), np.float32)
    context[:, 0] = 1.0
    return SampleRequest(context=context, sampler=kw.pop("sampler", "ddim"), steps=steps, **kw)


def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# --- parity with generate() on a real model --------------------------------------------


@pytest.fixture(scope="module")
def tiny_path() -> Path:
    return h.cached_tiny()[1]


def mixed_requests(class_names) -> list[dict]:
    """Different samplers (ddim with eta > 0 too), steps, guidance 1 and 5, classes, mixes,
    unconditional rows and n."""
    ctx = lambda classes, n, uncond=False: build_context(class_names, classes, uncond, n)[0]  # noqa: E731
    return [
        dict(context=ctx(["apple"], 2), sampler="ddpm", steps=10, guidance=1.0, seed=1),
        dict(context=ctx(None, 3), sampler="ddim", steps=8, guidance=5.0, eta=0.5, seed=2),
        dict(context=ctx(["cat"], 1), sampler="dpmpp", steps=6, guidance=5.0, seed=3),
        dict(context=ctx(["apple", "ball"], 4), sampler="ddim", steps=12, guidance=1.0, seed=4),
        dict(context=ctx(None, 2, uncond=True), sampler="dpmpp", steps=9, guidance=1.0, seed=5),
        dict(context=ctx(["ball"], 1), sampler="ddpm", steps=5, guidance=5.0, seed=6),
        dict(context=ctx(["cat"], 2), sampler="ddim", steps=7, guidance=5.0, eta=1.0, seed=7),
    ]


def test_concurrent_mixed_requests_equal_generate_alone(tiny_path):
    reference = OnnxDenoiser.load(tiny_path, provider=CPU, threads=1)
    denoiser = OnnxDenoiser.load(tiny_path, provider=CPU, threads=1)
    requests = mixed_requests(reference.info.class_names)
    with Engine(denoiser, EngineConfig(max_rows=16)) as engine:
        start = threading.Barrier(len(requests))

        def client(r):
            start.wait()  # all at once, from their own threads
            return engine.generate(timeout=120, **r)

        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(client, requests))
        stats = engine.stats()
    worst = 0.0
    for r, got in zip(requests, results):
        alone = generate(reference, **r)
        assert got.samples.shape == alone.samples.shape
        worst = max(worst, float(np.abs(got.samples - alone.samples).max()))
    print(f"engine vs generate() alone, fp32 CPU provider: max abs diff {worst:.3g}")
    assert worst <= 1e-5
    steps = sum(r["steps"] for r in requests)
    assert stats.calls < steps  # requests really shared calls
    assert stats.requests["ok"] == len(requests) and stats.active_rows == 0 and stats.queue_depth == 0
    # every call ran on a bucket's reused buffers, all kept bound at once
    assert set(denoiser._bindings) <= set(engine.buckets) and denoiser.MAX_BINDINGS >= len(engine.buckets)


def test_a_request_larger_than_max_rows_spreads_its_steps_over_calls(tiny_path):
    reference = OnnxDenoiser.load(tiny_path, provider=CPU, threads=1)
    denoiser = OnnxDenoiser.load(tiny_path, provider=CPU, threads=1)
    names = reference.info.class_names
    big = dict(context=build_context(names, None, False, 3)[0], sampler="dpmpp", steps=5, guidance=5.0, seed=11)
    small = dict(context=build_context(names, ["ball"], False, 1)[0], sampler="ddpm", steps=4, guidance=1.0, seed=12)
    with Engine(denoiser, EngineConfig(max_rows=4)) as engine:
        tickets = [engine.submit(SampleRequest(**big)), engine.submit(SampleRequest(**small))]
        got = [t.result(timeout=60) for t in tickets]
        stats = engine.stats()
    for r, g in zip((big, small), got):
        assert np.abs(g.samples - generate(reference, **r).samples).max() <= 1e-5
    assert stats.calls == 2 * 5 + 4  # 6 rows in calls of 4 + 2, then the small request
    assert max(stats.rows_per_call) == 4 and stats.rows_per_call[4] >= 5


def test_x0_frames_and_progress_like_generate(tiny_path):
    reference = OnnxDenoiser.load(tiny_path, provider=CPU, threads=1)
    context = build_context(reference.info.class_names, ["cat"], False, 2)[0]
    settings = dict(context=context, sampler="ddim", steps=6, guidance=5.0, eta=0.3, seed=5, record_x0=True)
    seen = []
    with Engine(OnnxDenoiser.load(tiny_path, provider=CPU, threads=1)) as engine:
        got = engine.generate(progress=lambda done, total: seen.append((done, total)), **settings)
    alone = generate(reference, **settings)
    assert len(got.x0_frames) == 6
    for a, b in zip(got.x0_frames, alone.x0_frames):
        assert np.abs(a - b).max() <= 1e-5
    assert seen[-1] == (6, 6) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    np.testing.assert_array_equal(got.timesteps, alone.timesteps)


# --- scheduling, on the stand-in -------------------------------------------------------


def test_bucket_sizes():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(48) == (1, 2, 4, 8, 16, 32, 48)


def test_one_call_carries_per_row_timesteps_and_zero_pad_rows():
    fake = FakeDenoiser(delay=0.002)
    with Engine(fake, EngineConfig(max_rows=8)) as engine:
        first = engine.submit(fake_request(n=2, steps=10))
        wait_until(lambda: first.done_steps >= 3)
        second = engine.submit(fake_request(n=1, steps=4, guidance=3.0))  # 2 rows: cond + uncond
        first.result(10), second.result(10)
    shared = [c for c in fake.calls if c[0] == 4 and len(set(c[1][:4].tolist())) == 2]
    assert shared, "no call carried both requests at their own timesteps"
    batch, timesteps, context, sample = shared[0]
    assert timesteps[0] == timesteps[1] != timesteps[2] == timesteps[3]
    np.testing.assert_array_equal(context[2], [1, 0])  # the guided request's conditional row
    np.testing.assert_array_equal(context[3], [0, 0])  # ... and its unconditional copy
    np.testing.assert_array_equal(sample[2], sample[3])  # both see the same x_t
    assert len(fake.created) == len(set(fake.created))  # each bucket's buffers made once, then reused


def test_pad_rows_are_zeroed():
    fake = FakeDenoiser()
    with Engine(fake, EngineConfig(max_rows=8)) as engine:
        engine.generate(**fake_request(n=3, steps=2).__dict__)  # 3 rows -> bucket 4, one pad row
    for batch, timesteps, context, sample in fake.calls:
        assert batch == 4
        assert timesteps[3] == 0 and not context[3].any() and not sample[3].any()
        assert context[:3].any(axis=1).all()


def test_timeout_frees_rows_and_the_engine_keeps_serving():
    fake = FakeDenoiser(delay=0.02)
    with Engine(fake, EngineConfig(max_rows=4, timeout_s=0.2)) as engine:
        ticket = engine.submit(fake_request(n=2, steps=20))  # ~0.4 s of calls
        with pytest.raises(RequestTimeout, match=r"timed out after 0.2 s"):
            ticket.result(10)
        wait_until(lambda: engine.stats().active_rows == 0)
        assert engine.generate(**fake_request(n=1, steps=3).__dict__).samples.shape == (1, 1, 4, 4)
        assert engine.stats().requests["timeout"] == 1


def test_cancel_frees_rows_for_the_next_request():
    fake = FakeDenoiser(delay=0.01)
    with Engine(fake, EngineConfig(max_rows=4)) as engine:
        long = engine.submit(fake_request(n=4, steps=20))  # takes every row
        wait_until(lambda: long.done_steps >= 1)
        waiting = engine.submit(fake_request(n=1, steps=2))
        time.sleep(0.05)
        assert engine.stats().queue_depth == 1  # it does not fit beside the long one
        assert long.cancel()
        assert waiting.result(10).samples.shape == (1, 1, 4, 4)
        with pytest.raises(concurrent.futures.CancelledError):
            long.result(1)
        stats = engine.stats()
    assert stats.requests["cancelled"] == 1 and long.done_steps < 20


def test_full_queue_is_refused_with_retry_after():
    gate = threading.Event()
    fake = FakeDenoiser(gate=gate)
    with Engine(fake, EngineConfig(max_rows=1, max_queue=1)) as engine:
        running = engine.submit(fake_request(n=1, steps=1))
        wait_until(lambda: engine.stats().active_requests == 1)
        queued = engine.submit(fake_request(n=1, steps=1))
        with pytest.raises(QueueFull, match=r"1 requests wait already \(max_queue 1\)") as e:
            engine.submit(fake_request(n=1, steps=1))
        assert e.value.retry_after >= 1
        gate.set()
        running.result(10), queued.result(10)
        assert engine.stats().requests["rejected"] == 1


@pytest.mark.parametrize("change, error, words", [
    (dict(context=np.ones((0, 2), np.float32)), PipelineError, "context must have shape"),
    (dict(context=np.ones((2, 3), np.float32)), PipelineError, "context must have shape"),
    (dict(context=np.ones((9, 2), np.float32)), RequestTooLarge, "at most 8"),
    (dict(sampler="euler"), SamplerError, "unknown sampler"),
    (dict(steps=0), SamplerError, "steps"),
    (dict(steps=21), SamplerError, "steps"),
    (dict(guidance=-1.0), PipelineError, "guidance"),
    (dict(guidance=float("nan")), PipelineError, "guidance"),
    (dict(seed=-1), PipelineError, "seed"),
    (dict(seed=1.5), PipelineError, "seed"),
    (dict(eta=0.5, sampler="ddpm"), PipelineError, "eta applies to the ddim sampler only"),
    (dict(eta=2.0), SamplerError, "eta"),
])
def test_bad_requests_fail_before_anything_is_queued(change, error, words):
    fake = FakeDenoiser()
    with Engine(fake, EngineConfig(max_images=8)) as engine:
        base = fake_request(n=1).__dict__
        with pytest.raises(error, match=words):
            engine.submit(SampleRequest(**{**base, **change}))
        assert engine.stats().queue_depth == 0 and not fake.calls


@pytest.mark.parametrize("config", [dict(max_rows=0), dict(max_queue=-1), dict(timeout_s=0), dict(max_images=0),
                                    dict(timeout_s=float("inf")), dict(max_rows=True)])
def test_bad_configs(config):
    with pytest.raises(EngineError):
        EngineConfig(**config)


def test_a_failed_call_fails_its_requests_only_and_the_engine_survives():
    fake = FakeDenoiser()
    fake.fail_next = True
    with Engine(fake) as engine:
        with pytest.raises(RuntimeError, match="the provider failed"):
            engine.submit(fake_request(n=1, steps=3)).result(10)
        assert engine.generate(**fake_request(n=2, steps=3).__dict__).samples.shape == (2, 1, 4, 4)
        assert engine.stats().requests["error"] == 1


def test_close_drains_then_refuses():
    fake = FakeDenoiser(delay=0.005)
    engine = Engine(fake, EngineConfig(max_rows=1))
    tickets = [engine.submit(fake_request(n=1, steps=3)) for _ in range(3)]
    engine.close()  # drain: every queued request still completes
    assert all(t.future.done() and t.future.exception() is None for t in tickets)
    with pytest.raises(EngineClosed):
        engine.submit(fake_request())


def test_close_without_drain_fails_pending_requests():
    gate = threading.Event()
    engine = Engine(FakeDenoiser(gate=gate), EngineConfig(max_rows=1))
    tickets = [engine.submit(fake_request(n=1, steps=2)) for _ in range(3)]
    wait_until(lambda: engine.stats().active_requests == 1)
    threading.Timer(0.1, gate.set).start()
    engine.close(drain=False, timeout=10)
    for t in tickets:
        with pytest.raises(EngineClosed):
            t.result(1)
    assert not engine._thread.is_alive()


def test_asyncio_wait_and_cancellation_by_the_awaiting_task():
    fake = FakeDenoiser(delay=0.01)

    async def main(engine):
        done = await engine.submit(fake_request(n=1, steps=3)).wait()
        slow = engine.submit(fake_request(n=1, steps=20))
        task = asyncio.ensure_future(slow.wait())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return done, slow

    with Engine(fake) as engine:
        done, slow = asyncio.run(main(engine))
        wait_until(lambda: engine.stats().requests["cancelled"] == 1)
    assert done.samples.shape == (1, 1, 4, 4) and slow.future.cancelled()


def test_max_queue_zero_takes_only_what_fits_at_once():
    gate = threading.Event()
    with Engine(FakeDenoiser(gate=gate), EngineConfig(max_rows=2, max_queue=0)) as engine:
        first = engine.submit(fake_request(n=1, steps=1))
        wait_until(lambda: engine.stats().active_requests == 1)
        second = engine.submit(fake_request(n=1, steps=1))  # fits beside the first: taken
        assert engine.stats().queue_depth == 1  # it joins between calls
        with pytest.raises(QueueFull):
            engine.submit(fake_request(n=1, steps=1))
        gate.set()
        first.result(10), second.result(10)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the re-raised bug
def test_an_engine_thread_that_fails_leaves_no_request_waiting(monkeypatch):
    gate = threading.Event()
    engine = Engine(FakeDenoiser(gate=gate), EngineConfig(max_rows=1))
    running = engine.submit(fake_request(n=1, steps=2))
    waiting = engine.submit(fake_request(n=1, steps=2))
    wait_until(lambda: engine.stats().active_requests == 1)

    def broken(now):
        raise RuntimeError("a bug in the scheduler")

    monkeypatch.setattr(engine, "_admit", broken)
    gate.set()
    engine._thread.join(10)
    for t in (running, waiting):
        with pytest.raises(EngineClosed, match="a bug in the scheduler"):
            t.result(1)
    with pytest.raises(EngineClosed):
        engine.submit(fake_request())


def test_progress_reports_every_step_even_when_steps_finish_between_wake_ups():
    """A fast provider can finish several steps before the waiting thread wakes: each step is
    still reported once, in order, and nothing is reported twice."""
    from mdx.runtime.engine import Ticket

    ticket = Ticket(1, n=1, rows=1, total_steps=5, deadline=time.monotonic() + 60)
    calls = []
    reported = ticket._report(lambda d, t: calls.append((d, t)), 0, 3)  # woke up after step 3
    reported = ticket._report(lambda d, t: calls.append((d, t)), reported, 3)  # nothing new
    reported = ticket._report(lambda d, t: calls.append((d, t)), reported, 5)
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)] and reported == 5
