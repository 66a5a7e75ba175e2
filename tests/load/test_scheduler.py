"""Unit tests of the open-loop scheduler and the arrival process (pure logic; the target is a fake)."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time

from services.cli.load import (
    MIX,
    MonotonicClock,
    OpenLoopScheduler,
    Recorder,
    plan_arrivals,
    poisson_arrivals,
)


class FakeSlowTarget:
    """A FAKE service that answers each request only after ``delay`` seconds; it records when each
    request arrived and when it answered, and the latency the generator measured for it."""

    def __init__(self, clock: MonotonicClock, recorder: Recorder, delay: float) -> None:
        self.clock = clock
        self.recorder = recorder
        self.delay = delay
        self.arrived: list[float] = []
        self.answered: list[float] = []

    async def request(self, scheduled: float) -> None:
        self.arrived.append(self.clock.now())
        await asyncio.sleep(self.delay)
        self.answered.append(self.clock.now())
        self.recorder.record("GET /fake", scheduled, self.clock.now(), 200, "ok", "200")


def test_poisson_arrivals_have_the_rate_and_exponential_gaps() -> None:
    times = poisson_arrivals(50.0, 200.0, random.Random(3))
    assert all(0 <= t < 200.0 for t in times) and times == sorted(times)
    assert abs(len(times) / 200.0 - 50.0) < 50.0 * 0.05
    gaps = [b - a for a, b in itertools.pairwise(times)]
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert 0.9 < cv < 1.1, cv  # exponential: standard deviation equals the mean


def test_the_plan_depends_only_on_the_seed_and_follows_the_mix() -> None:
    a = plan_arrivals(40.0, 100.0, MIX, seed=11)
    assert a == plan_arrivals(40.0, 100.0, MIX, seed=11)
    assert a != plan_arrivals(40.0, 100.0, MIX, seed=12)
    share = sum(1 for x in a if x.kind == "play") / len(a)
    assert abs(share - MIX["play"] / sum(MIX.values())) < 0.03


async def test_arrivals_do_not_wait_for_answers_from_a_slow_target() -> None:
    clock = MonotonicClock()
    recorder = Recorder()
    target = FakeSlowTarget(clock, recorder, delay=1.5)
    sched = OpenLoopScheduler(clock, max_in_flight=100)
    start = clock.now() + 0.05
    offsets = [i * 0.01 for i in range(20)]  # 20 arrivals over 0.2 s, each answered after 1.5 s
    for off in offsets:
        sched.schedule(start + off, "fake", target.request)
    t0 = time.monotonic()
    await sched.run_until(start + 0.25)
    assert time.monotonic() - t0 < 1.0, "a closed loop would have taken 20 x 1.5 s"
    assert len(target.arrived) == 20 and not target.answered, "every request was sent before any answer"
    assert sched.in_flight == 20
    assert await sched.drain(timeout=10.0) == 0
    # sent on the schedule: each arrival at its own time, not after the previous answer
    assert max(target.arrived) - min(target.arrived) < 0.2 + 0.5
    assert max(sched.stats.send_delays) < 0.5
    assert sorted(s.latency for s in recorder.samples)[0] >= 1.5


async def test_latency_is_measured_from_the_scheduled_time_when_the_generator_is_late() -> None:
    """Coordinated omission: a request sent late (here scheduled 0.4 s in the past) carries the wait."""
    clock = MonotonicClock()
    recorder = Recorder()
    fast = FakeSlowTarget(clock, recorder, delay=0.0)
    sched = OpenLoopScheduler(clock, max_in_flight=10)
    sched.schedule(clock.now() - 0.4, "fake", fast.request)
    await sched.run_until(clock.now())
    await sched.drain(timeout=5.0)
    assert recorder.samples[0].latency >= 0.4
    assert sched.stats.send_delays[0] >= 0.4


async def test_overflow_beyond_max_in_flight_is_counted_not_sent() -> None:
    clock = MonotonicClock()
    recorder = Recorder()
    target = FakeSlowTarget(clock, recorder, delay=1.0)
    sched = OpenLoopScheduler(clock, max_in_flight=3)
    now = clock.now()
    for i in range(10):
        sched.schedule(now + 0.01 * i, "browse" if i % 2 else "play", target.request)
    await sched.run_until(now + 0.2)
    assert len(target.arrived) == 3
    assert sum(sched.stats.overflow.values()) == 7
    assert sched.stats.fired.total() == 3
    await sched.drain(timeout=5.0)
    assert len(recorder.samples) == 3


async def test_jobs_scheduled_by_running_jobs_fire_on_their_own_clock() -> None:
    """A session's heartbeats: scheduled by the start, from the start's scheduled time."""
    clock = MonotonicClock()
    fired: list[tuple[str, float, float]] = []
    sched = OpenLoopScheduler(clock, max_in_flight=10)

    async def beat(scheduled: float) -> None:
        fired.append(("beat", scheduled, clock.now()))

    async def start(scheduled: float) -> None:
        await asyncio.sleep(0.15)  # the start's answer is slow; the beats keep their times
        for k in (1, 2, 3):
            sched.schedule(scheduled + 0.1 * k, "heartbeat", beat)

    t = clock.now()
    sched.schedule(t, "play", start)
    sched.schedule(t + 10.0, "late", beat)  # due after the end
    await sched.run_until(t + 0.5)
    assert [round(s - t, 2) for _k, s, _at in fired] == [0.1, 0.2, 0.3]
    assert fired[1][2] >= t + 0.2 and fired[2][2] >= t + 0.3
    assert sched.discard_pending() == 1 and sched.stats.discarded == 1
    await sched.drain(timeout=5.0)
