"""One simulated world per run: clock, seeded randomness, trace, eventfd wiring.

Time is an integer count of device clock cycles (default 250 MHz).  The data
path (device engines, guest traffic, relay pollers) runs as simpy processes;
the control plane (back-end, driver) runs outside them and advances the world
when it blocks (an MMIO read, a sleep, a poll).  Blocking from inside a simpy
process would deadlock the model, so it raises instead.

Determinism: every component draws from ``world.rng(name)``, seeded from the
run seed and a stable hash of the name (never ``hash()``); no wall clock is
read; the trace digest is a sha256 over canonical records.
"""
from __future__ import annotations

import collections
import hashlib
import math
import os
import random
import select
from heapq import heappop, heappush
from typing import Callable

import simpy
from simpy.core import EmptySchedule, StopSimulation
from simpy.events import NORMAL, URGENT, Event

DEFAULT_CLOCK_HZ = 250_000_000


class BlockingInProcess(RuntimeError):
    """A control-plane call tried to advance time from inside a simpy process."""


class Trace:
    """Canonical event records folded into a sha256, the last few kept for reading.

    A record is one line, ``"<cycle> <source> <event> k=v k=v\\n"`` with the
    fields sorted by name.  Lines are hashed in chunks (sha256 over the
    concatenation is the same however it is split), so a record costs a
    string format and a list append; ``digest()``, ``records`` and ``find``
    see everything recorded so far.
    """

    FLUSH = 512                 # lines per sha256 update

    def __init__(self, keep: int = 2000):
        self._hash = hashlib.sha256()
        self._keep = keep
        self._records: collections.deque = collections.deque(maxlen=keep)
        self._lines: list[str] = []
        self.count = 0
        self.counts: dict[str, int] = {}

    def record(self, cycle: int, source: str, event: str, fields: dict) -> None:
        if len(fields) == 1:
            # (an int formats as _canon would format it: the common cases, inline)
            ((k, v),) = fields.items()
            body = f"{k}={v}" if type(v) is int else f"{k}={_canon(v)}"
            self.add(f"{cycle} {source} {event} {body}\n", event)
        elif fields:
            body = " ".join([f"{k}={v}" if type(v := fields[k]) is int else f"{k}={_canon(v)}"
                             for k in sorted(fields)])
            self.add(f"{cycle} {source} {event} {body}\n", event)
        else:
            self.add(f"{cycle} {source} {event} \n", event)

    def add(self, line: str, event: str) -> None:
        """Record a line already in canonical form (hot paths build it themselves:
        it must be exactly what ``record`` would make of the same fields)."""
        lines = self._lines
        lines.append(line)
        if len(lines) >= self.FLUSH:
            self._flush()
        self.count += 1
        counts = self.counts
        counts[event] = counts.get(event, 0) + 1

    def _flush(self) -> None:
        lines = self._lines
        if not lines:
            return
        self._hash.update("".join(lines).encode())
        # (kept as recorded, newline and all: only readers pay for stripping)
        self._records.extend(lines if len(lines) <= self._keep else lines[-self._keep:])
        lines.clear()

    @property
    def records(self) -> collections.deque:
        """The last ``keep`` records, oldest first (without the newline)."""
        self._flush()
        return collections.deque([line.rstrip("\n") for line in self._records],
                                 maxlen=self._keep)

    def digest(self) -> str:
        self._flush()
        return self._hash.hexdigest()

    def find(self, event: str) -> list[str]:
        """Kept records of one event kind (for tests and error reports)."""
        return [r for r in self.records if r.split(" ", 3)[2] == event]


def _canon(value) -> str:
    if type(value) is int:          # the common case first
        return str(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canon(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value).replace(" ", "_").replace("\n", "_")


class _Environment(simpy.Environment):
    """simpy's Environment with the step loop of ``run()`` inlined.

    Same semantics as simpy 4.1's ``run``/``step`` (the ``until`` event,
    StopSimulation, failed events crash the run), minus a method call and
    its lookups per event: the datapath steps millions of events.  Both
    ``run`` and ``step`` also take the World's call entries (see ``call_at``).
    """

    def run(self, until=None):
        if until is not None:
            if not isinstance(until, Event):
                at = until if isinstance(until, int) else float(until)
                if at <= self._now:
                    raise ValueError(
                        f"until ({at}) must be greater than the current simulation time")
                until = Event(self)
                until._ok = True
                until._value = None
                self.schedule(until, URGENT, at - self._now)
            elif until.callbacks is None:
                return until.value
            until.callbacks.append(StopSimulation.callback)
        queue = self._queue
        try:
            while True:
                if not queue:
                    raise EmptySchedule
                entry = heappop(queue)
                self._now = entry[0]
                if len(entry) == 5:
                    # (a call_at/call_with entry: one function, never fails,
                    # never stops the run -- only the ``until`` event does)
                    entry[3](entry[4])
                    continue
                event = entry[3]
                callbacks, event.callbacks = event.callbacks, None
                try:
                    for callback in callbacks:
                        callback(event)
                except StopSimulation:
                    event.callbacks = callbacks[callbacks.index(callback) + 1:]
                    self.schedule(event, -1)
                    raise
                if not event._ok and not hasattr(event, "_defused"):
                    exc = type(event._value)(*event._value.args)
                    exc.__cause__ = event._value
                    raise exc
        except StopSimulation as exc:
            return exc.args[0]
        except EmptySchedule:
            if until is not None:
                assert not until.triggered
                raise RuntimeError("No scheduled events left but \"until\" event was not "
                                   f"triggered: {until}") from None
        return None

    def step(self):
        queue = self._queue
        if queue and len(queue[0]) == 5:
            entry = heappop(queue)
            self._now = entry[0]
            entry[3](entry[4])
            return
        super().step()


# A scheduled call is a heap entry of its own, ``(cycle, priority, event id, fn,
# arg)``: ``_Environment.run``/``step`` run ``fn(arg)``, no event object and no
# callbacks list is built per call.  Entries compare by (cycle, priority, id)
# alone (ids are unique), so they order among simpy's 4-tuples exactly as a
# Timeout/Event scheduled at the same point would.


class World:
    """The shared clock, randomness and trace of one simulation run."""

    def __init__(self, seed: int = 0, clock_hz: int = DEFAULT_CLOCK_HZ):
        if clock_hz <= 0:
            raise ValueError("clock_hz must be positive")
        self.seed = seed
        self.clock_hz = clock_hz
        self.env = _Environment()
        self._queue = self.env._queue       # simpy's heap and event-id counter, for
        self._eid = self.env._eid           # call_at & co. (they never change)
        self._advancing = False
        self._cycles: dict = {}
        self.trace = Trace()
        self._fd_watchers: dict[int, list[Callable[[int], None]]] = {}
        self._poll: select.poll | None = None

    # --- time ---------------------------------------------------------------
    @property
    def now(self) -> int:
        """Current time in cycles."""
        return int(self.env._now)       # (simpy's ``now`` property is a frame more)

    def cycles(self, ns: float) -> int:
        """Nanoseconds to cycles, rounded up (a delay is never shortened)."""
        # (memoised: the same few delays are converted for every doorbell and
        # interrupt; bounded, as real-time mode converts a new span each time)
        c = self._cycles.get(ns)
        if c is None:
            c = math.ceil(ns * self.clock_hz / 1e9 - 1e-9) if ns > 0 else 0
            if len(self._cycles) < 256:
                self._cycles[ns] = c
        return c

    def ns(self, cycles: int) -> int:
        """Cycles to whole nanoseconds (rounded down)."""
        return cycles * 1_000_000_000 // self.clock_hz

    def now_ns(self) -> int:
        return self.ns(self.now)

    def in_process(self) -> bool:
        return self.env.active_process is not None

    def run_until(self, cycle: int) -> None:
        """Advance the world to ``cycle`` (control plane only)."""
        if self.in_process():
            raise BlockingInProcess(
                f"blocking call from simpy process {self.env.active_process!r}: "
                "data-path actors must yield events, not block")
        if self._advancing:
            # A datapath callback (an engine round, a guest core step, an
            # eventfd watcher) tried to block: same bug as from a process, and
            # a nested run would step events out of order.
            raise BlockingInProcess("blocking call from a simpy callback: data-path actors "
                                    "must schedule events, not block")
        self._advancing = True
        try:
            if cycle > self.env.now:
                self.env.run(until=cycle)
            # simpy stops *before* events due at ``until``; the control plane means
            # "everything up to and including this cycle has happened".
            while self.env.peek() == cycle:
                self.env.step()
        finally:
            self._advancing = False

    def advance(self, cycles: int) -> None:
        self.run_until(self.now + max(0, cycles))

    def advance_ns(self, ns: float) -> None:
        self.advance(self.cycles(ns))

    def process(self, generator):
        return self.env.process(generator)

    def timeout(self, cycles: int):
        return self.env.timeout(max(0, int(cycles)))

    def call_first(self, callback: Callable[[object], None]) -> None:
        """Run ``callback(event)`` now, before the events already due now: where
        ``env.process()`` would run a new process's first step (an urgent event)."""
        heappush(self._queue, (self.env._now, URGENT, next(self._eid), callback, None))

    def schedule_now(self, event) -> None:
        """Schedule an event object (``callbacks``, ``_ok``) to be processed now,
        after what is already due now: what ``Event.succeed()`` does."""
        heappush(self._queue, (self.env._now, NORMAL, next(self._eid), event))

    def call_at(self, cycle: int, callback: Callable[[object], None]) -> None:
        """Run ``callback(event)`` at ``cycle`` (now if that is past).

        Exactly what ``env.timeout(cycle - now).callbacks.append(callback)``
        does, in the same order against every other event (same priority,
        the next event id), without building a Timeout: the datapath
        schedules one of these per round, per completion and per batch on
        the wire, so the saving is paid back millions of times.  The event
        passed is None: callbacks must not look at it.
        """
        now = self.env._now
        heappush(self._queue, (cycle if cycle > now else now, NORMAL, next(self._eid), callback,
                               None))

    def call_with(self, cycle: int, fn: Callable[[object], None], arg) -> None:
        """``call_at(cycle, lambda _ev: fn(arg))`` (same order), without the lambda:
        its frame and closure per event, on the paths that schedule millions."""
        now = self.env._now
        heappush(self._queue, (cycle if cycle > now else now, NORMAL, next(self._eid), fn, arg))

    # --- randomness and trace -------------------------------------------------
    def rng(self, name: str) -> random.Random:
        """A generator private to ``name``: same seed and name, same stream, any process."""
        digest = hashlib.sha256(f"{self.seed}\0{name}".encode()).digest()
        return random.Random(int.from_bytes(digest[:16], "little"))

    def record(self, source: str, event: str, **fields) -> None:
        self.trace.record(int(self.env._now), source, event, fields)

    def digest(self) -> str:
        return self.trace.digest()

    # --- eventfds -------------------------------------------------------------
    # The writer and the watcher of an eventfd usually hold different fd
    # numbers for it (one end came over vhost-user with SCM_RIGHTS), so a
    # signal cannot be routed by number.  Instead, after every write, every
    # watched fd that is readable is reported: watchers must be idempotent
    # (a fd stays readable until its owner drains it).
    def watch_fd(self, fd: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(fd)`` whenever ``fd`` may have become readable."""
        self._fd_watchers.setdefault(fd, []).append(callback)
        self._poll = None

    def unwatch_fd(self, fd: int, callback: Callable[[int], None] | None = None) -> None:
        if callback is None:
            self._fd_watchers.pop(fd, None)
        else:
            watchers = self._fd_watchers.get(fd, [])
            if callback in watchers:
                watchers.remove(callback)
            if not watchers:
                self._fd_watchers.pop(fd, None)
        self._poll = None

    def watched_fds(self) -> list[int]:
        return list(self._fd_watchers)

    def signal_fd(self, fd: int) -> None:
        """Write 1 to an eventfd (a real one: it may belong to another process) and wake watchers."""
        if fd < 0:
            return
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            # A closed fd: the signal is lost, as a real MSI-X write to a
            # torn-down irqfd would be; the trace says so.
            self.record("world", "signal_lost")
            return
        self.wake_readable()

    def wake_readable(self) -> None:
        """Report every watched fd that is readable now (C code wrote some)."""
        watchers = self._fd_watchers
        if not watchers:
            return
        poll = self._poll
        if poll is None:
            poll = self._poll = select.poll()
            for watched in watchers:
                poll.register(watched, select.POLLIN)
        ready = poll.poll(0)
        if not ready:
            return
        if len(ready) > 1:
            ready.sort()
        for fd, _ in ready:
            callbacks = watchers.get(fd)
            if not callbacks:
                continue
            if len(callbacks) == 1:
                callbacks[0](fd)
            else:
                for callback in list(callbacks):   # a watcher may unwatch
                    callback(fd)

    def notify_watchers(self, fd: int) -> None:
        """Wake the watchers of one fd (for callers that know it is readable)."""
        for callback in list(self._fd_watchers.get(fd, ())):
            callback(fd)
