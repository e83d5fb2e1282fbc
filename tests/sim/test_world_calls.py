"""World.call_at / call_with / call_first: the same order as the simpy events they stand for.

The datapath schedules its rounds, completions and wire batches as call
entries instead of Timeouts; the trace digest only stays what it was if each
entry runs exactly where the Timeout (or a new process's first step) would
have, among every other event, including ties at the same cycle, entries
scheduled from inside callbacks, cycles already past, and the cycle a
``run_until`` stops at (which ``step()`` runs).
"""
from __future__ import annotations

import random

from sim.world import World


def _script(world: World, log: list, as_calls: bool, seed: int) -> None:
    """A random mix of plain simpy events and calls, some scheduling more."""
    env = world.env
    rng = random.Random(seed)

    def later(delay: int, tag: str) -> None:
        if as_calls:
            world.call_with(env.now + delay, hit, tag)
        else:
            env.timeout(delay).callbacks.append(lambda _ev, t=tag: hit(t))

    def first(tag: str) -> None:
        if as_calls:
            world.call_first(lambda _ev, t=tag: hit(t))
        else:
            def proc(t=tag):
                hit(t)
                yield env.timeout(0)
            env.process(proc())

    def hit(tag: str) -> None:
        log.append((env.now, tag))
        depth = tag.count(".")
        if depth < 3:
            for i in range(rng.randrange(3)):
                kind = rng.randrange(4)
                child = f"{tag}.{i}"
                if kind == 0:
                    first(child)
                elif kind == 1:
                    later(0, child)            # same cycle, after what is due now
                else:
                    later(rng.choice([1, 2, 5]), child)

    def ticker():
        # simpy events of their own (a process and its timeouts) in between
        for i in range(20):
            log.append((env.now, f"tick{i}"))
            yield env.timeout(rng.choice([1, 2, 3]))

    world.process(ticker())
    for i in range(12):
        later(rng.choice([0, 1, 2, 3, 5, 8]), f"r{i}")
        if i % 4 == 0:
            first(f"f{i}")


def _run(as_calls: bool, seed: int) -> list:
    world = World(seed=1)
    log: list = []
    _script(world, log, as_calls, seed)
    for until in (2, 3, 5, 9, 40):        # stops at cycles where entries are due
        world.run_until(until)
    return log


def test_calls_run_where_the_events_they_replace_would():
    for seed in range(20):
        events = _run(False, seed)
        calls = _run(True, seed)
        assert len(events) > 20
        assert calls == events, f"seed {seed}"


def test_call_at_a_past_cycle_runs_now_after_what_is_already_due():
    world = World()
    world.run_until(10)
    order = []
    world.env.timeout(0).callbacks.append(lambda _ev: order.append("timeout"))
    world.call_at(3, lambda _ev: order.append("past"))
    world.call_first(lambda _ev: order.append("first"))
    world.run_until(10)
    assert order == ["first", "timeout", "past"]
    assert world.now == 10


def test_a_call_that_raises_ends_the_run_and_leaves_the_rest_scheduled():
    """A call entry runs outside simpy's event handling: its exception must
    still surface from run_until, at the cycle it happened, and the entries
    after it stay in the heap."""
    world = World()
    order = []

    def boom(_arg):
        raise LookupError("from a datapath callback")

    world.call_with(2, order.append, "before")
    world.call_with(3, boom, None)
    world.call_with(4, order.append, "after")
    try:
        world.run_until(10)
    except LookupError as exc:
        assert "datapath callback" in str(exc)
    else:
        raise AssertionError("the callback's exception was swallowed")
    assert order == ["before"] and world.now == 3
    assert [entry[4] for entry in world.env._queue if len(entry) == 5] == ["after"]
