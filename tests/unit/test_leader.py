"""Leader election (``handlers/leader.py``) against an in-memory Lease, with injected clocks.

Covers:
- the first candidate takes the Lease and a second one follows, renewing or not;
- wall clocks hours apart never give two leaders (the holder's ``renewTime`` is
  not compared with anybody's clock);
- a partitioned leader (its calls fail, or hang, or its write lands but the
  answer is lost) stops leading at its first failed renewal, before its renew
  deadline and before a rival may take over; at no instant do two lead;
- a released Lease is taken at the rival's next attempt;
- the law "two replicas never both lead" over random schedules of attempts,
  time, clock rates and skews, partitions and releases (hypothesis);
- the timings are checked as client-go checks them, with errors instead of
  ``sys.exit``; ``LeaderOnlyKube`` refuses writes once the replica does not lead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from token_budget.errors import Conflict, EnforcementError, NotLeader
from token_budget.handlers.leader import (
    LeaderElector,
    LeaderOnlyKube,
    LeaseStore,
    Record,
    Timings,
)

TIMINGS = Timings()  # client-go's defaults: 15 s, 10 s, 2 s
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


class World:
    """The one true time (seconds) and the Lease as the API server holds it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lease: Record | None = None
        self.versions = 0

    def commit(self, record: Record) -> Record:
        self.versions += 1
        self.lease = dataclasses.replace(record, version=str(self.versions))
        return self.lease


class Replica(LeaseStore):
    """One replica's view: its own clocks, and a network that may fail it."""

    def __init__(self, world: World, rate: float = 1.0, offset: float = 0.0,
                 skew: dt.timedelta = dt.timedelta(0)) -> None:
        self.world = world
        self.rate, self.offset, self.skew = rate, offset, skew
        self.partitioned = False  # every call fails before reaching the server
        self.answers_lost = False  # writes land, their answers never arrive
        self.hang: asyncio.Event | None = None  # calls wait for this (a silent network)
        self.elector = LeaderElector(self, f"replica-{id(self)}", TIMINGS,
                                     clock=self.monotonic, wall=self.wall)

    def monotonic(self) -> float:
        return self.offset + self.world.now * self.rate

    def wall(self) -> dt.datetime:
        return EPOCH + dt.timedelta(seconds=self.world.now) + self.skew

    async def _reach(self) -> None:
        if self.hang is not None:
            await self.hang.wait()
        if self.partitioned:
            raise EnforcementError("GET /leases: connection refused")

    async def get(self) -> Record | None:
        await self._reach()
        return self.world.lease

    async def create(self, record: Record) -> Record:
        await self._reach()
        if self.world.lease is not None:
            raise Conflict("leases: already exists")
        return self._answer(self.world.commit(record))

    async def update(self, record: Record) -> Record:
        await self._reach()
        if self.world.lease is None or self.world.lease.version != record.version:
            raise Conflict("leases: the object has been modified")
        return self._answer(self.world.commit(record))

    def _answer(self, record: Record) -> Record:
        if self.answers_lost:
            raise EnforcementError("PUT /leases: read timed out")
        return record

    @property
    def leads(self) -> bool:
        return self.elector.is_leader


def leaders(replicas: list[Replica]) -> list[Replica]:
    return [r for r in replicas if r.leads]


def test_the_first_candidate_takes_the_lease_and_the_second_follows() -> None:
    world = World()
    a, b = Replica(world), Replica(world)
    assert run(a.elector.try_acquire_or_renew())
    assert not run(b.elector.try_acquire_or_renew())
    for _ in range(20):  # a renews every 2 s for 40 s: b never takes over
        world.now += TIMINGS.retry_seconds
        assert run(a.elector.try_acquire_or_renew())
        assert not run(b.elector.try_acquire_or_renew())
    assert world.lease is not None and world.lease.holder == a.elector.identity
    assert world.lease.transitions == 0


def test_a_silent_leader_is_replaced_one_lease_after_the_rival_saw_its_record() -> None:
    world = World()
    a, b = Replica(world), Replica(world)
    run(a.elector.try_acquire_or_renew())
    run(b.elector.try_acquire_or_renew())  # b sees a's record at t=0
    world.now = 14.9
    assert not run(b.elector.try_acquire_or_renew())
    assert not a.leads, "a stopped at its renew deadline (10 s)"
    world.now = 15.0
    assert run(b.elector.try_acquire_or_renew())
    assert world.lease is not None and world.lease.transitions == 1


@pytest.mark.parametrize("skew_a, skew_b", [
    pytest.param(dt.timedelta(hours=-1), dt.timedelta(hours=1),
                 id="the leader's clock an hour behind"),
    pytest.param(dt.timedelta(hours=1), dt.timedelta(hours=-1),
                 id="the leader's clock an hour ahead"),
    pytest.param(dt.timedelta(0), dt.timedelta(days=-400), id="the rival's clock a year behind"),
])
def test_wall_clocks_hours_apart_never_give_two_leaders(skew_a: dt.timedelta,
                                                        skew_b: dt.timedelta) -> None:
    world = World()
    a, b = Replica(world, skew=skew_a), Replica(world, skew=skew_b)
    run(a.elector.try_acquire_or_renew())
    for _ in range(100):
        world.now += 0.5
        for r in (b, a):
            run(r.elector.try_acquire_or_renew())
            assert len(leaders([a, b])) == 1, "exactly one leads while a keeps renewing"
    assert a.leads


@pytest.mark.parametrize("failure", ["partitioned", "answers_lost"])
def test_a_partitioned_leader_steps_down_before_its_deadline_and_before_a_rival_takes_over(
        failure: str) -> None:
    world = World()
    a, b = Replica(world), Replica(world)
    run(a.elector.try_acquire_or_renew())
    last_renewal = 0.0
    stepped_down = took_over = None
    step = 0.1
    while world.now < 40:
        world.now = round(world.now + step, 6)
        if world.now == 5.0:
            setattr(a, failure, True)
        due = round(world.now / TIMINGS.retry_seconds, 6).is_integer()
        if due:  # both try every retry period
            if run(a.elector.try_acquire_or_renew()) and world.now < 5.0:
                last_renewal = world.now
            run(b.elector.try_acquire_or_renew())
        assert len(leaders([a, b])) <= 1, f"two leaders at t={world.now}"
        if stepped_down is None and not a.leads:
            stepped_down = world.now
        if took_over is None and b.leads:
            took_over = world.now
    assert stepped_down == 6.0, "at its first failed renewal, 1 s after the partition"
    assert stepped_down < last_renewal + TIMINGS.renew_deadline_seconds
    if failure == "partitioned":
        assert took_over is not None and took_over >= last_renewal + TIMINGS.lease_seconds
    else:  # its renewals still land: the rival keeps waiting, and nobody acts
        assert took_over is None


def test_a_renewal_that_hangs_ends_leadership_at_the_renew_deadline() -> None:
    async def scenario() -> None:
        world = World()
        a = Replica(world)
        await a.elector.try_acquire_or_renew()
        a.hang = asyncio.Event()
        attempt = asyncio.create_task(a.elector.try_acquire_or_renew())
        await asyncio.sleep(0)
        world.now = 9.99
        assert a.leads
        world.now = 10.0
        assert not a.leads, "no answer, no leadership past the deadline"
        attempt.cancel()

    run(scenario())


def test_a_released_lease_is_taken_at_the_rivals_next_attempt() -> None:
    world = World()
    a, b = Replica(world), Replica(world)
    run(a.elector.try_acquire_or_renew())
    run(b.elector.try_acquire_or_renew())
    world.now = 1.0
    run(a.elector.release())
    assert not a.leads
    assert world.lease is not None and world.lease.holder == ""
    world.now = 2.0
    assert run(b.elector.try_acquire_or_renew()), "no lease to wait for"
    assert not run(a.elector.try_acquire_or_renew()), "a released replica never runs again"


def test_a_replica_that_does_not_hold_the_lease_does_not_release_it() -> None:
    world = World()
    a, b = Replica(world), Replica(world)
    run(a.elector.try_acquire_or_renew())
    run(b.elector.try_acquire_or_renew())
    run(b.elector.release())
    assert world.lease is not None and world.lease.holder == a.elector.identity


@st.composite
def schedules(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[tuple[str, int, float]]]:
    n = draw(st.integers(2, 3))
    replicas = [{
        # NTP keeps monotonic clocks within 500 ppm; wall clocks may be anything.
        "rate": draw(st.floats(0.9995, 1.0005)),
        "offset": draw(st.floats(0, 1e6)),
        "skew": dt.timedelta(seconds=draw(st.floats(-86400, 86400))),
    } for _ in range(n)]
    steps = draw(st.lists(st.tuples(
        st.sampled_from(["attempt"] * 8 + ["wait"] * 6 + ["partition", "heal", "lose-answers",
                                                           "release"]),
        st.integers(0, n - 1),
        # Waits around the timings' edges (retry, deadline, lease) as well as anywhere.
        st.one_of(st.sampled_from([0.5, 2.0, 5.0, 9.99, 10.0, 14.99, 15.0, 15.01]),
                  st.floats(0.01, 20.0))), min_size=8, max_size=40))
    return replicas, steps


@settings(max_examples=300, deadline=None)
@given(schedule=schedules())
def test_law_two_replicas_never_both_lead(
        schedule: tuple[list[dict[str, Any]], list[tuple[str, int, float]]]) -> None:
    specs, steps = schedule
    world = World()
    replicas = [Replica(world, **spec) for spec in specs]
    for action, i, seconds in steps:
        r = replicas[i]
        if action == "attempt":
            run(r.elector.try_acquire_or_renew())
        elif action == "wait":
            world.now += seconds
        elif action == "partition":
            r.partitioned = True
        elif action == "heal":
            r.partitioned = r.answers_lost = False
        elif action == "lose-answers":
            r.answers_lost = True
        else:
            run(r.elector.release())
        assert len(leaders(replicas)) <= 1


@pytest.mark.parametrize("lease, deadline, retry", [
    pytest.param(10, 10, 2, id="a lease no longer than the renew deadline"),
    pytest.param(15, 2.4, 2, id="a renew deadline within a jittered retry"),
    pytest.param(15, 10, 0, id="no retry period"),
])
def test_timings_that_cannot_keep_two_leaders_apart_are_refused(
        lease: float, deadline: float, retry: float) -> None:
    with pytest.raises(ValueError, match="must be greater than"):
        Timings(lease, deadline, retry)


def test_timings_for_a_lease_keep_client_go_proportions() -> None:
    assert Timings.for_lease(15) == Timings(15, 10, 2)
    assert Timings.for_lease(6) == Timings(6, 4, 0.8)


def test_a_replica_that_does_not_lead_may_not_write() -> None:
    world = World()
    a = Replica(world)
    kube = LeaderOnlyKube(None, a.elector)
    with pytest.raises(NotLeader, match="does not hold the lease"):
        kube.request("PATCH", "/apis/apps/v1/namespaces/x/deployments/y", body={})
    run(a.elector.try_acquire_or_renew())
    world.now = 3.0
    assert a.elector.write_window() == pytest.approx(12.0), "until a rival could take over"
    world.now = 10.0
    assert a.elector.write_window() == 0.0
    with pytest.raises(NotLeader):
        kube.request("DELETE", "/api/v1/namespaces/x/pods/p")
