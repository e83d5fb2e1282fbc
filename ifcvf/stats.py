"""Statistics of one VF and its queues: one typed snapshot (``VdpaDevice.stats``).

The IFCVF has no counter registers, so what the driver reports is what it
counts itself: the kicks it relayed to the VF's doorbells, the VF's
interrupts it relayed to the guest, and, while the software relay
interposes, the used entries it copied, the buffer pages it logged, its
polls and the doorbells it rang for the guest; the used rings it marked in
the dirty log; the migration mode and phase.  Counters only grow for the
life of the VF (a relay restarted by a mode switch adds to them).

What the device itself saw (descriptor chains, frames, bytes, drops, bad
descriptors) comes from whoever can read it: on the simulator, the model's
datapath; the caller passes it in as ``DeviceQueueCounters``, and the driver
never reaches for it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RelayCounters:
    """What the driver relayed for one queue (cumulative)."""

    kicks: int = 0          # guest kicks written to the VF's doorbell
    interrupts: int = 0     # VF interrupts taken while the relay interposed
    relayed: int = 0        # used entries copied to the guest's ring (software relay)
    signals: int = 0        # guest call eventfd writes by the relay
    polls: int = 0          # relays without an interrupt (adaptive polls)
    relay_kicks: int = 0    # doorbells rung for the guest (it published past a stale avail_event)
    pages_logged: int = 0   # buffer pages the relay marked in the dirty log

    def add(self, other: "RelayCounters") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class DeviceQueueCounters:
    """What the device saw on one queue (the simulator's model; none on real IFCVF)."""

    chains: int = 0          # descriptor chains completed (used entries written)
    frames: int = 0
    bytes: int = 0
    dropped: int = 0         # frames dropped, every reason (the sum of ``drops``)
    bad_descriptors: int = 0  # TX chains refused (runts, oversize)
    #: Dropped frames by reason, every reason the device counts (zeros included).
    #: RX: ``fifo_full`` (no room to wait for buffers), ``not_running`` (arrived while
    #: the queue did not run), ``flushed_at_stop`` (waiting when the queue stopped),
    #: ``too_big`` (bigger than the buffer chain, without MRG_RXBUF), ``oversize``
    #: (longer than the MTU allows).  TX: ``runt`` (shorter than a header and a
    #: minimal frame), ``oversize``.
    drops: dict[str, int] = field(default_factory=dict)
    kicks: int = 0           # doorbell writes the device took
    interrupts: int = 0      # interrupts it raised
    last_avail: int = 0
    last_used: int = 0
    broken: str | None = None


@dataclass(frozen=True)
class DeviceCounters:
    """What the device saw as a whole (the simulator's model)."""

    queues: dict[int, DeviceQueueCounters] = field(default_factory=dict)
    port_tx_frames: int = 0
    port_tx_bytes: int = 0
    port_rx_frames: int = 0
    port_rx_bytes: int = 0
    rx_no_queue: int = 0     # frames for a queue pair the guest has not enabled
    log_marks: int = 0       # pages the device marked in the dirty log (hardware logging)


@dataclass(frozen=True)
class QueueStats:
    index: int
    direction: str           # "rx" (even vrings) or "tx"
    running: bool
    relayed_by_sw: bool      # the software relay interposes on its used ring now
    driver: RelayCounters
    broken: str | None       # why the relay stopped serving it, if it did
    device: DeviceQueueCounters | None = None


#: Migration phases a VF goes through, as the back-end sees them.
PHASES = ("none", "logging", "paused", "switched-over", "cancelled", "restarted")


@dataclass(frozen=True)
class MigrationStats:
    mode: str                 # "hw-logging" or "sw-relay": how this VF migrates
    phase: str                # one of PHASES
    migrations: int           # times LOG_ALL was set while the VF ran
    switch_overs: int         # times the VF was stopped with LOG_ALL set (GET_VRING_BASE)
    pauses: int               # times the VF was stopped for want of a usable log
    log_marks: int            # used rings the driver marked dirty at its stops
    last_precopy_s: float | None   # LOG_ALL set -> stop at switch-over, last migration
    #: How long this VF's rings stood still in the last migration, as far as this
    #: back-end can see: paused for want of a log, plus the switch-over stop until
    #: the VF ran again on this back-end (a cancelled or failed migration, or one
    #: back again).  None while unknown (the guest went on on the destination).
    last_downtime_s: float | None


@dataclass(frozen=True)
class VfStats:
    name: str
    kind: str
    state: str                # VdpaDevice.mode: stopped, direct, hw-logging, sw-relay, paused
    features: int             # negotiated (0 while stopped)
    queue_pairs: int          # the VF's
    migration: MigrationStats
    queues: list[QueueStats]
    device: DeviceCounters | None = None

    def to_dict(self) -> dict:
        """JSON-ready: features in hex; the device's per-queue counters only under each queue."""
        out = asdict(self)
        out["features"] = f"{self.features:#x}"
        if out["device"] is not None:
            del out["device"]["queues"]
        return out

    def summary(self) -> str:
        """One line for the log: the state, the migration, and the queues that did anything."""
        busy = []
        for q in self.queues:
            counts = {k: v for k, v in asdict(q.driver).items() if v}
            if q.device is not None:
                counts.update({f"dev_{k}": v for k, v in asdict(q.device).items()
                               if v and k in ("chains", "frames", "bytes", "dropped", "bad_descriptors")})
                counts.update({f"dev_drop_{k}": v for k, v in q.device.drops.items() if v})
            if counts or q.broken:
                busy.append(f"q{q.index} {counts}" + (f" broken: {q.broken}" if q.broken else ""))
        m = self.migration
        return (f"{self.state}, migration {m.mode}/{m.phase} ({m.migrations} started, {m.switch_overs} "
                f"switch-overs, {m.pauses} pauses), " + ("; ".join(busy) or "no traffic"))
