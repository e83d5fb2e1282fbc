"""The fault matrix (``ifcvf sim faults``): each fault at each phase of a migration.

A fault is injected into an otherwise ordinary simulated migration (a guest
with one queue pair under low-rate traffic both ways, 16 MiB of RAM) at one
phase, reached through the migration's own progress events:

- ``before-logging``: traffic runs, no log yet;
- ``pre-copy``: after the first pre-copy iteration, the VF logging;
- ``stop-and-copy``: the guest paused, before the source's rings are stopped;
- ``after-switch-over``: the guest runs on the destination.

Faults: ``stop-never-acks``, ``frontend-disconnect``, ``small-log``,
``mem-table-changed``, ``relay-map-fails`` (software relay), ``dma-fault`` (RX
descriptors past the guest's RAM), ``surprise-removal`` (the function reads all
ones and does no more DMA).

Each row records the outcome (``completed``, ``failed``: the migration did not
happen and the guest stays on the source), pages lost (destination RAM that
differs from source RAM at switch-over), frames lost, and leaks: fds and
eventfds open before the run and not after, IOMMU mappings besides guest
memory on a VF the guest stays on, logging left on.  A failure must name its
reason in the log (``reason``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sim.frontend import FrontEndError, Region
from sim.scenario import load

PHASES = ("before-logging", "pre-copy", "stop-and-copy", "after-switch-over")
PROGRESS_EVENT = {"before-logging": "traffic", "pre-copy": "iteration",
                  "stop-and-copy": "stop-and-copy", "after-switch-over": "resumed"}

BASE_SCENARIO = """\
name = "fault-matrix"
kind = "migration"
seed = 13

[driver]
devargs = "{devargs}"
queue_pairs = 1
queue_size = 256
guest_memory_mib = 16

[traffic]
rx_pps = 20000
tx_pps = 20000
warmup_us = 300
duration_us = 2000

[migration]
bandwidth_mib_s = 1024
"""


@dataclass
class Row:
    fault: str
    phase: str
    outcome: str
    expected: str
    pages_lost: int = 0
    frames_lost: int = 0
    leaks: list[str] = field(default_factory=list)
    reason: str = ""

    mode: str = "hw"
    frames_lost_allowed: bool = False

    @property
    def ok(self) -> bool:
        return (self.outcome == self.expected and not self.pages_lost and not self.leaks
                and (not self.frames_lost or self.frames_lost_allowed))

    def as_json(self) -> dict:
        return dataclasses.asdict(self) | {"ok": self.ok}


# --- the faults: (inject(run, phase) -> what to look for in the log, expected outcome per phase)

def _stop_never_acks(run, phase):
    """The source VF's queues never acknowledge a stop (queue_enable keeps reading 1)."""
    vf = run.current
    vf.model.config = vf.model.config.replace(stop_never_acks=True)


def _frontend_disconnect(run, phase):
    """The front-end (QEMU) closes its vhost-user socket."""
    run.fe.close()
    run.host.pump()


def _small_log(run, phase):
    """SET_LOG_BASE with a log smaller than the memory table needs."""
    from hal.memory import HostMemory

    small = HostMemory(4096, "small-log")
    try:
        run.fe.set_log_base(small.fd, 8)
    finally:
        small.close()


def _mem_table_changed(run, phase):
    """SET_MEM_TABLE again while the VF is configured: the guest's RAM in two regions."""
    ram = run.vm.ram if run.current is run.vfs[0] else run._dst_ram
    half = ram.size // 2
    run.fe.set_memory([Region(0, half, ram.fd, ram.address, 0),
                       Region(half, ram.size - half, ram.fd, ram.address + half, half)])


def _relay_map_fails(run, phase):
    """Every DMA map of the software relay's mediated rings (IOVA 0x2000_0000_0000 up) fails
    on the VF the guest runs on: the switch to the relay cannot happen."""
    run.current.model.iommu.refuse_maps_from = 0x2000_0000_0000


def _dma_fault(run, phase):
    """The guest points every RX descriptor at an IOVA nothing maps (past its RAM):
    the VF's next DMA write into a buffer faults in its IOMMU domain."""
    import struct

    ram = run.vm.ram if run.current is run.vfs[0] else run._dst_ram
    desc, _, _ = run.vm.guest.queue_addresses(0)
    view = ram.view
    for i in range(run.vm.queue_size):
        struct.pack_into("<Q", view, desc + 16 * i, ram.size + (1 << 30))


def _surprise_removal(run, phase):
    """The VF the guest runs on disappears: MMIO and config reads return all ones,
    writes go nowhere, its DMA stops."""
    run.current.model.surprise_remove()


FAULTS = {
    "stop-never-acks": (_stop_never_acks, {p: "completed" for p in PHASES}),
    "frontend-disconnect": (_frontend_disconnect, {"before-logging": "failed", "pre-copy": "failed",
                                                   "stop-and-copy": "failed",
                                                   "after-switch-over": "completed"}),
    "small-log": (_small_log, {p: "completed" for p in PHASES}),
    "mem-table-changed": (_mem_table_changed, {p: "completed" for p in PHASES}),
    "relay-map-fails": (_relay_map_fails, {p: "completed" for p in PHASES}),
    "dma-fault": (_dma_fault, {p: "completed" for p in PHASES}),
    "surprise-removal": (_surprise_removal, {p: "completed" for p in PHASES}),
}
# The logging mode each fault runs in (the relay's maps exist only with the software relay).
MODE = {"relay-map-fails": "sw"}
# Frames the guest cannot receive once its front-end is gone are not the driver's to deliver.
# Nor are frames to a guest that broke its own ring (the VF stops that ring by design).
FRAMES_LOST_ALLOWED = {("frontend-disconnect", "after-switch-over")} | {
    ("dma-fault", phase) for phase in PHASES} | {("surprise-removal", "after-switch-over")}


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.warnings: list[str] = []
        self.disconnects: list[str] = []

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.warnings.append(record.getMessage())
        elif "disconnected" in record.getMessage():
            self.disconnects.append(record.getMessage())


def _fds() -> dict[int, str]:
    out = {}
    for n in os.listdir("/proc/self/fd"):
        try:
            out[int(n)] = os.readlink(f"/proc/self/fd/{n}")
        except OSError:
            pass
    return out


def run_one(fault: str, phase: str, *, mode: str | None = None, tmp: Path | None = None) -> Row:
    from ifcvf.tools.runs.migration import MigrationRun

    inject, expected = FAULTS[fault]
    mode = mode or MODE.get(fault, "hw")
    devargs = "vdpa=1" + (",sw-live-migration=1" if mode == "sw" else "")
    path = (tmp or Path("/tmp")) / f"fault-{fault}-{phase}.toml"
    path.write_text(BASE_SCENARIO.format(devargs=devargs))
    scenario = load(path)
    row = Row(fault, phase, "?", expected[phase], mode=mode,
              frames_lost_allowed=(fault, phase) in FRAMES_LOST_ALLOWED)
    event = PROGRESS_EVENT[phase]
    state = {"done": False, "error": None}
    errors = _Errors()
    root = logging.getLogger("ifcvf")
    old_level, old_propagate = root.level, root.propagate
    root.setLevel(logging.INFO)
    root.propagate = False      # the row carries the reason; the console stays quiet
    root.addHandler(errors)
    before = _fds()
    threads = threading.active_count()
    run = None

    def progress(ev, info):
        if ev == event and not state["done"]:
            state["done"] = True
            try:
                inject(run, phase)
            except (FrontEndError, OSError) as err:
                state["error"] = err

    try:
        run = MigrationRun(scenario, progress)
        original_migrate = run._migrate

        def migrate(src, dst, sram, dram):
            run._dst_ram = dram
            return original_migrate(src, dst, sram, dram)
        run._migrate = migrate
        try:
            result = run.run()
        except (FrontEndError, OSError) as err:   # the QEMU role cannot go on
            row.outcome = "failed"
            row.reason = f"the front-end failed: {err}"
            for vf in run.vfs:   # the back-end closed with its front-end: nothing left mapped
                maps = vf.model.iommu.mappings()
                if maps:
                    row.leaks.append(f"{vf.model.name}: IOMMU mappings {maps} after the front-end left")
                if vf.model.lm.logging_enabled:
                    row.leaks.append(f"{vf.model.name}: hardware logging still on")
            _close_quietly(run)
            result = None
        if result is not None:
            mig = result.get("migration", {})
            inv = result.get("invariants", {})
            if mig.get("converged") and not mig.get("cancelled"):
                row.outcome = "completed"
            else:
                row.outcome = "failed"
            row.pages_lost = len(inv.get("mismatched_pages") or [])
            row.frames_lost = int(inv.get("frames_lost") or 0)
            row.leaks += list(run.leaked)
            if inv.get("exclusive") is False:   # not a leak, but as bad: both sides ran at once
                row.leaks.append("source and destination queues ran at the same time")
            if inv.get("in_order") is False or inv.get("frames_duplicated"):
                row.leaks.append(f"frames out of order or duplicated ({inv.get('frames_duplicated')})")
            if not result.get("ok", True):
                row.reason = "; ".join(str(p)[:200] for p in result.get("problems", []))
    finally:
        root.removeHandler(errors)
        root.setLevel(old_level)
        root.propagate = old_propagate
        path.unlink(missing_ok=True)
    after = _fds()
    if threading.active_count() > threads:
        row.leaks.append(f"{threading.active_count() - threads} thread(s) left running")
    for fd in sorted(set(after) - set(before)):
        row.leaks.append(f"fd {fd} ({after[fd]})")
    if not state["done"]:
        row.leaks.append(f"the {phase} phase was never reached")
    # What the driver logged first names the reason (a failure: the disconnect).
    logged = errors.warnings or (errors.disconnects if row.outcome == "failed" or
                                 fault == "frontend-disconnect" else [])
    if logged:
        row.reason = logged[0] + (f" ({row.reason})" if row.reason else "")
    elif not row.reason:
        row.reason = "(nothing logged)"
    return row


def _close_quietly(run) -> None:
    try:
        run.host.close()
    except Exception:   # the run failed half-way: release what can be released
        logging.getLogger("ifcvf.tools").debug("closing after a failed run", exc_info=True)
    dst = getattr(run, "_dst_ram", None)
    if dst is not None:
        dst.close()


def matrix(*, mode: str | None = None, faults=None, phases=PHASES, tmp: Path | None = None) -> list[Row]:
    return [run_one(f, p, mode=mode, tmp=tmp) for f in (faults or FAULTS) for p in phases]
