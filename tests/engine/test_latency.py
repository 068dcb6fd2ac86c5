"""Latency: models compared in interleaved rounds with fixed threads; the CUDA timer uses CUDA events
(checked on CPU by substituting torch.cuda's event and synchronise functions)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaprune.engine import measure
from metaprune.engine.measure import compare_latency, measure_latency


class _Clock:
    """A fake clock: each forward pass of a _Drifting model takes longer than the previous one."""

    def __init__(self):
        self.now, self.calls = 0.0, 0


class _Drifting(nn.Module):
    def __init__(self, clock: _Clock, cost: float):
        super().__init__()
        self.clock, self.cost = clock, cost
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        self.clock.calls += 1
        self.clock.now += self.cost * (1 + 0.1 * self.clock.calls)  # the machine slows down over time
        return x


@pytest.fixture
def fake_timer(monkeypatch):
    clock = _Clock()

    def timer(device):
        def t(run):
            t0 = clock.now
            run()
            return clock.now - t0
        return t
    monkeypatch.setattr(measure, "_timer", timer)
    return clock


def test_identical_models_compare_equal_despite_drift(fake_timer):
    a, b = _Drifting(fake_timer, 1.0), _Drifting(fake_timer, 1.0)
    r = compare_latency({"a": a, "b": b}, (2,), rounds=10, repeats=2, warmup=1)
    assert r["ratios"]["a"] == 1.0 and r["ratios"]["b"] == pytest.approx(1.0, abs=0.05)
    assert r["models"]["b"]["ms"] == pytest.approx(r["models"]["a"]["ms"], rel=0.05)
    assert r["interleaved"] and r["rounds"] == 10 and r["models"]["a"]["repeats"] == 20
    # measured one after the other (what the reports did), the same drift makes b look 40 % slower
    sa = measure_latency(a, (2,), repeats=20, warmup=1)["ms"]
    sb = measure_latency(b, (2,), repeats=20, warmup=1)["ms"]
    assert sb / sa > 1.3


def test_a_model_twice_as_fast_gives_ratio_two(fake_timer):
    slow, fast = _Drifting(fake_timer, 2.0), _Drifting(fake_timer, 1.0)
    r = compare_latency({"before": slow, "after": fast}, (2,), rounds=8, repeats=1, warmup=0)
    assert r["ratios"]["after"] == pytest.approx(2.0, rel=0.1)


def test_threads_are_fixed_during_the_measurement_and_restored():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    old = torch.get_num_threads()
    want = 2 if old != 2 else 3
    r = compare_latency({"a": Probe(), "b": Probe()}, (2,), rounds=3, repeats=1, warmup=1, threads=want)
    assert set(seen) == {want} and r["threads"] == want and torch.get_num_threads() == old


class _FakeEvent:
    log: list = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        _FakeEvent.log.append("record")
        self.t = len(_FakeEvent.log)

    def elapsed_time(self, other):
        return 7.5 * (other.t - self.t)  # a value no wall clock would give


def test_cuda_timer_uses_events_between_synchronisations(monkeypatch):
    syncs = []
    _FakeEvent.log = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device) or _FakeEvent.log.append("sync"))
    ran = []
    ms = measure._timer(torch.device("cuda", 0))(lambda: ran.append(1) or _FakeEvent.log.append("run"))
    assert ms == 15.0  # (end.t - start.t) = 2 steps (run, record) x 7.5
    assert _FakeEvent.log == ["sync", "record", "run", "record", "sync"] and ran == [1]
    assert syncs == [torch.device("cuda", 0)] * 2


def test_measurements_go_through_the_device_timer(monkeypatch):
    devices = []
    real = measure._timer
    monkeypatch.setattr(measure, "_timer", lambda d: devices.append(d) or real(d))
    m = nn.Linear(3, 3)
    assert measure_latency(m, (3,), repeats=2)["timer"] == "perf_counter"
    compare_latency({"a": m, "b": m}, (3,), rounds=1, repeats=1)
    assert devices == [torch.device("cpu")] * 2
