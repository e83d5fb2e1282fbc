"""Per-virtqueue device state and the engine hook the datapath plugs into.

The register model owns what the driver programs (size, ring addresses,
vector, enable) and the IFCVF stop handshake; an *engine* owns the work on the
rings.  The model calls ``engine.start()`` when the queue is enabled and the
driver has set DRIVER_OK, ``engine.stop(done)`` on the stop command (or a
reset), and ``engine.kick()`` when a doorbell lands.  An engine with DMA in
flight calls ``done()`` only once that work has finished: the model
acknowledges the stop (queue_enable reads 0, the LM ring-state word gets the
live indexes) no earlier than that and no earlier than ``queue_stop_ns``.

Engines move ``last_avail`` / ``last_used`` on the QueueState they serve.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from sim.virtio_regs import NO_VECTOR


class QueueEngine(Protocol):
    def start(self) -> None: ...
    def stop(self, done: Callable[[], None]) -> None: ...
    def kick(self) -> None: ...


class IdleEngine:
    """The default engine: no DMA, so a stop has nothing to wait for."""

    def __init__(self, queue: "QueueState"):
        self.queue = queue
        self.starts = 0
        self.stops = 0
        self.kicks = 0

    def start(self) -> None:
        self.starts += 1

    def stop(self, done: Callable[[], None]) -> None:
        self.stops += 1
        done()

    def kick(self) -> None:
        self.kicks += 1


@dataclass
class QueueState:
    """One virtqueue as the device holds it."""

    index: int
    max_size: int
    notify_off: int
    size: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    msix_vector: int = NO_VECTOR
    enabled: bool = False     # what queue_enable reads (stays 1 until a stop is acknowledged)
    running: bool = False     # the engine is started
    stopping: bool = False    # stop commanded, not yet acknowledged
    stopped: bool = False     # the last stop was acknowledged (cleared by enable and reset)
    last_avail: int = 0       # live indexes: what the engine has fetched / completed
    last_used: int = 0
    ring_state: int = 0       # the latched LM word: restore value, or live value at the last stop
    doorbells: int = 0        # doorbells that reached the queue
    epoch: int = 0            # bumped by reset and stop, so stale timers do nothing
    engine: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.size == 0:
            self.size = self.max_size

    @property
    def live_ring_state(self) -> int:
        """The live indexes in ring-state word form: last_avail | last_used << 16."""
        return (self.last_avail & 0xFFFF) | (self.last_used & 0xFFFF) << 16

    def reset(self) -> None:
        """Back to power-on values (the engine is kept; the caller has stopped it)."""
        self.size = self.max_size
        self.desc = self.avail = self.used = 0
        self.msix_vector = NO_VECTOR
        self.enabled = self.running = self.stopping = self.stopped = False
        self.last_avail = self.last_used = 0
        self.ring_state = 0
        self.epoch += 1
