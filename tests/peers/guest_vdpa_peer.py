"""Runs INSIDE the test guest: the driver's real code path on QEMU's virtio-net-pci behind a vIOMMU.

    python guest_vdpa_peer.py RESULTS_DIR TOKEN RX_FRAMES

In order, in one boot:

1. bind: the NIC found and bound to vfio-pci with ``hal.sysfs``;
2. conformance: ``ifcvf conformance --device BDF --junit`` (a subprocess, so
   the VFIO group is free for it), JUnit XML into RESULTS_DIR;
3. probe: ``VdpaDevice`` with ``vdpa=1,generic-virtio-net=1,sw-live-migration=1``
   (and the refusals without those devargs);
4. direct: ``dev_conf`` with LOG_ALL off over a small in-guest vhost device
   (``FakeVhost``): the host sends RX_FRAMES frames, the script sends its own
   TX frames through kicks the C notify relay turns into doorbell writes;
5. sw: ``dev_conf`` again with LOG_ALL and a dirty log: the software relay
   interposes on the RX used ring; the host sends RX_FRAMES more frames;
6. cleanup: ``close``, fds and threads back to where they were, unbind.

The host learns when to send through console lines
``IFCVF-PEER READY|SKIP <phase> <token>``.  Every observation goes into
RESULTS_DIR/peer.json, one key per part; a part that fails records its
traceback under ``error`` (also printed) and the script goes on with what
still makes sense, so the host can report each part on its own.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from hal.memory import HostMemory, align_up
from hal.sysfs import Sysfs
from hal.vfio import VfioFunction
from ifcvf import ids
from ifcvf.devargs import parse
from ifcvf.dirtylog import DirtyLog
from ifcvf.vhost.protocol import log_size
from ifcvf.vdpa import DeviceSetup, ProbeError, VdpaDevice, Vring
from ifcvf.vhost.memory import GuestMemory, Region

MiB = 1 << 20
PAGE = 4096
RING_SIZE = 64
# Guest-physical layout of the in-guest "VM": rings and TX buffers in region A,
# RX buffers in region B, which (as QEMU's regions often are) starts 1 MiB into
# its memfd mapping.
REGION_A = (0x0, 2 * MiB, 0)              # gpa, size, mmap_offset
REGION_B = (0x4000_0000, 2 * MiB, 1 * MiB)
RX_RING, TX_RING = 0x1000, 0x4000
TX_BUFFERS = 0x10_0000
RX_CHAINS = 8
NET_HDR = 12          # virtio_net_hdr_v1 (VERSION_1)
TX_SIZES = (60, 333, 1000, 1514)
SRC_MAC = bytes.fromhex("525400123456")
ETHERTYPE = b"\x88\xb5"
WAIT_S = 90.0         # generous for TCG; every wait ends on a condition
FEATURES = ids.bit(ids.Feature.VERSION_1) | ids.bit(ids.Feature.NET_MAC)
DEVARGS = "vdpa=1,generic-virtio-net=1,sw-live-migration=1"


def say(*words) -> None:
    print("IFCVF-PEER", *words, flush=True)


def wait_until(clock, predicate, what: str, timeout: float = WAIT_S) -> None:
    """Poll a condition through the HAL clock (guest memory a device writes has no fd to wait on)."""
    clock.poll_until(predicate, int(timeout * 1e9), interval_ns=1_000_000, what=what)


def fds_open() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def eventfd_count(fd: int, timeout: float = 0.0) -> int:
    """What the eventfd holds (0 if nothing within timeout); reading resets it."""
    if not select.select([fd], [], [], timeout)[0]:
        return 0
    return os.eventfd_read(fd)


# --- a minimal split ring in guest memory --------------------------------------------------
class GuestRing:
    """The guest driver's side of one split virtqueue (addresses are GPAs)."""

    def __init__(self, memory: GuestMemory, base: int, size: int):
        self.memory = memory
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = align_up(self.avail + 6 + 2 * size, PAGE)
        self.end = align_up(self.used + 6 + 8 * size, PAGE)
        memory.view(base, self.end - base)[:] = bytes(self.end - base)
        self.next_desc = 0
        self.avail_idx = 0
        self.chains: dict[int, list[tuple[int, int, int]]] = {}   # head -> [(gpa, len, flags)]

    def _u16(self, gpa: int) -> ctypes.c_uint16:
        # One aligned 16-bit access: the device and the relay read and write these concurrently.
        return ctypes.c_uint16.from_address(self.memory.gpa_to_host(gpa, 2))

    def post(self, buffers: list[tuple[int, int, bool]]) -> int:
        head = self.next_desc
        chain = []
        for i, (gpa, length, writable) in enumerate(buffers):
            d = (head + i) % self.size
            flags = (2 if writable else 0) | (1 if i + 1 < len(buffers) else 0)
            struct.pack_into("<QIHH", self.memory.view(self.desc + 16 * d, 16), 0, gpa, length, flags,
                             (d + 1) % self.size)
            chain.append((gpa, length, flags))
        self.chains[head] = chain
        self.next_desc = (head + len(buffers)) % self.size
        self._u16(self.avail + 4 + 2 * (self.avail_idx % self.size)).value = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._u16(self.avail + 2).value = self.avail_idx
        return head

    def used_idx(self) -> int:
        return self._u16(self.used + 2).value

    def used_elems(self, count: int) -> list[tuple[int, int]]:
        return [struct.unpack_from("<II", self.memory.view(self.used + 4 + 8 * (n % self.size), 8))
                for n in range(count)]

    def read_chain(self, head: int, length: int) -> bytes:
        """The first ``length`` bytes the device wrote into chain ``head``'s writable buffers."""
        out = b""
        for gpa, blen, flags in self.chains[head]:
            if flags & 2 and len(out) < length:
                out += bytes(self.memory.view(gpa, min(blen, length - len(out))))
        return out


@dataclass
class LogArea:
    memory: HostMemory
    offset: int
    size: int
    log: DirtyLog


class FakeVhost:
    """What a vhost-user back-end would hand the driver, built in this process.

    Two memfd regions as guest RAM, an RX and a TX ring, eventfds for kicks and
    calls, and (``with_log``) a dirty log, as SET_LOG_BASE would give one.
    """

    def __init__(self, name: str, features: int, *, with_log: bool):
        self.features = features
        self.mappings = []
        regions = []
        for i, (gpa, size, offset) in enumerate((REGION_A, REGION_B)):
            mapping = HostMemory(offset + size, f"{name}-ram{i}")
            self.mappings.append(mapping)
            regions.append(Region(gpa, size, 0x7F00_0000_0000 + gpa, offset, mapping))
        self.memory = GuestMemory(regions)
        self.rx = GuestRing(self.memory, RX_RING, RING_SIZE)
        self.tx = GuestRing(self.memory, TX_RING, RING_SIZE)
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.log = None
        if with_log:
            size = log_size(self.memory.end)
            log_mem = HostMemory(align_up(size), f"{name}-log")
            self.log = LogArea(log_mem, 0, size, DirtyLog(log_mem.view[:size]))
        self.bases: list[tuple[int, int, int]] = []
        self.config_changes = 0

    # --- what a back-end gives the driver, and takes back -------------------------------
    def setup(self) -> DeviceSetup:
        vrings = [Vring(i, r.size, r.desc, r.avail, r.used, r.used, 0, 0, self.kick[i], self.call[i], True)
                  for i, r in enumerate((self.rx, self.tx))]
        return DeviceSetup(self.features, self.memory, vrings, self.log)

    def save_bases(self, states) -> None:
        self.bases = [(index, s.last_avail, s.last_used) for index, s in sorted(states.items())]

    def config_changed(self) -> None:
        self.config_changes += 1

    def used_rings_logged(self) -> list[int]:
        """The guest used rings whose page is marked in the log."""
        if self.log is None:
            return []
        pages = set(self.log.log.dirty_pages())
        return [r.used for r in (self.rx, self.tx) if r.used >> 12 in pages]

    # --- the guest driver's part ------------------------------------------------------------
    def post_rx_buffers(self) -> list[dict]:
        """RX chains three pages apart (no two share a page); most straddle a page boundary.

        Even chains: one 2048-byte buffer at +0xF00.  Odd chains: the 12-byte
        header across a page boundary, the frame in a buffer two pages on.
        """
        base = REGION_B[0]
        posted = []
        for k in range(RX_CHAINS):
            page = base + 3 * k * PAGE
            if k % 2 == 0:
                bufs = [(page + 0xF00, 2048, True)]
            else:
                bufs = [(page + 0xFF8, NET_HDR, True), (page + 2 * PAGE + 0x800, 1800, True)]
            head = self.rx.post(bufs)
            posted.append({"head": head, "buffers": [[g, n] for g, n, _ in bufs]})
        return posted

    def send(self, frames: list[bytes], vdpa: VdpaDevice) -> list[dict]:
        """Each frame in its own chain, kicked through the kick eventfd, completed before the next."""
        done = []
        for i, frame in enumerate(frames):
            at = TX_BUFFERS + i * PAGE
            data = bytes(NET_HDR) + frame
            if i % 2 == 0:
                self.memory.view(at, len(data))[:] = data
                bufs = [(at, len(data), False)]
            else:       # header and frame in two descriptors
                self.memory.view(at, NET_HDR)[:] = bytes(NET_HDR)
                self.memory.view(at + 0x100, len(frame))[:] = frame
                bufs = [(at, NET_HDR, False), (at + 0x100, len(frame), False)]
            before = self.tx.used_idx()
            head = self.tx.post(bufs)
            os.eventfd_write(self.kick[1], 1)
            wait_until(vdpa.fn.clock, lambda: self.tx.used_idx() != before, f"TX frame {i} to complete")
            done.append({"head": head, "used_idx": self.tx.used_idx()})
        return done

    def received(self, count: int) -> list[dict]:
        out = []
        for desc_id, length in self.rx.used_elems(count):
            data = self.rx.read_chain(desc_id, length) if desc_id in self.rx.chains else b""
            out.append({"id": desc_id, "len": length, "header": data[:NET_HDR].hex(),
                        "frame": data[NET_HDR:].hex()})
        return out

    def close(self) -> None:
        for fd in self.kick + self.call:
            os.close(fd)
        if self.log is not None:
            self.log.log.release()
            self.log.memory.close()
        self.memory.close()


def tx_frames(token: str, phase: str) -> list[bytes]:
    frames = []
    for i, size in enumerate(TX_SIZES):
        payload = f"ifcvf-peer {token} tx {phase} {i} ".encode()
        body = (payload * (size // len(payload) + 1))[:size - 14]
        frames.append(b"\xff" * 6 + SRC_MAC + ETHERTYPE + body)
    return frames


# --- instrumentation of the driver's register writes -------------------------------------
class Recorder:
    """Wraps the driver's common-config window: every queue_enable write, the status at every reset."""

    def __init__(self, hw):
        self.hw = hw
        self.phase = "init"
        self.queue_enable_writes: list[dict] = []
        self.resets: list[dict] = []
        self.selected = None
        common = hw.common
        write16, reset = common.write16, hw.reset

        def recording_write16(off, value):
            if off == ids.Common.QUEUE_SELECT:
                self.selected = value
            elif off == ids.Common.QUEUE_ENABLE:
                self.queue_enable_writes.append({"phase": self.phase, "queue": self.selected, "value": value})
            write16(off, value)

        def recording_reset():
            self.resets.append({"phase": self.phase, "status_before": hw.status()})
            reset()

        common.write16 = recording_write16
        hw.reset = recording_reset


def relay_stats(relay, q: int) -> dict:
    s = relay.stats(q)
    return {"kicks": s.kicks, "interrupts": s.interrupts, "relayed": s.relayed, "signals": s.signals,
            "broken": None if s.broken is None else str(s.broken)}


def queue_used_address(hw, q: int) -> int:
    hw.common.write16(ids.Common.QUEUE_SELECT, q)
    return hw.common.read32(ids.Common.QUEUE_USED) | hw.common.read32(ids.Common.QUEUE_USED + 4) << 32


# --- the parts ----------------------------------------------------------------------------
def part_bind(out: dict, ctx: dict) -> None:
    sysfs = Sysfs()
    out["iommu_enabled"] = sysfs.iommu_enabled()
    nics = [f for f in sysfs.functions() if (f.vendor, f.device) == (0x1AF4, 0x1041)]
    out["nics"] = [f.address for f in nics]
    assert len(nics) == 1, f"expected one 1af4:1041 function, found {out['nics']}"
    nic = nics[0]
    out.update(address=nic.address, iommu_group=nic.iommu_group, driver_before=nic.driver)
    started = time.monotonic()
    bound = sysfs.bind_vfio(nic.address)
    out["seconds"] = round(time.monotonic() - started, 2)
    out["driver"] = bound.driver
    out["group_device_exists"] = os.path.exists(bound.group_device)
    ctx["bdf"] = nic.address
    ctx["sysfs"] = sysfs


def part_conformance(out: dict, ctx: dict, results: str) -> None:
    junit = os.path.join(results, "conformance.xml")
    log_path = os.path.join(results, "conformance.txt")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ifcvf", "conformance", "--device", ctx["bdf"],
                           "--junit", junit], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    out["seconds"] = round(time.monotonic() - started, 1)
    out["exit_code"] = proc.returncode
    out["junit"] = junit
    with open(log_path, "w") as f:
        f.write(proc.stdout)
    print(proc.stdout, flush=True)


def part_probe(out: dict, ctx: dict) -> None:
    fn = ctx["fn"]
    for name, text in (("without_sw_live_migration", "vdpa=1,generic-virtio-net=1"),
                       ("without_generic_virtio_net", "vdpa=1,sw-live-migration=1")):
        try:
            VdpaDevice(fn, parse(text))
            out[f"{name}_error"] = None
        except ProbeError as err:
            out[f"{name}_error"] = str(err)
    vdpa = VdpaDevice(fn, parse(DEVARGS))
    ctx["vdpa"] = vdpa
    ctx["recorder"] = Recorder(vdpa.hw)
    out.update(kind=vdpa.kind, has_lm_block=vdpa.hw.has_lm_block, lm_absent_reason=vdpa.hw.lm_absent_reason,
               has_stop_command=vdpa.hw.has_stop_command, device_features=vdpa.device_features,
               get_features=vdpa.get_features(), queue_pairs=vdpa.get_queue_num(),
               msix_vectors=fn.msix_vectors(), notify_bar=vdpa.hw.caps.notify.bar)


def run_phase(out: dict, ctx: dict, phase: str, token: str, rx_frames: int, *, logging: bool) -> None:
    """One dev_conf .. dev_close cycle with traffic both ways; the host sends after READY."""
    fn, vdpa, rec = ctx["fn"], ctx["vdpa"], ctx["recorder"]
    features = vdpa.get_features() & FEATURES
    if logging:
        features |= ids.bit(ids.Feature.LOG_ALL)
    guest = FakeVhost(f"peer-{phase}", features, with_log=logging)
    try:
        out["negotiated"] = features
        out["rx_posted"] = guest.post_rx_buffers()
        rec.phase = f"{phase}:dev_conf"
        vdpa.dev_conf(guest.setup(), guest.config_changed)
        run = vdpa.running
        rec.phase = f"{phase}:running"
        out["mode"] = vdpa.mode
        out["driver_features"] = vdpa.hw.driver_features()
        out["status"] = vdpa.hw.status()
        out["dma_mappings"] = sorted([iova, size] for iova, size in fn.dma_mappings().items())
        bar = vdpa.hw.notify_region
        out["bar"] = {"index": bar.bar, "base": bar.base, "size": bar.size}
        out["doorbells"] = {str(q): {"c": int(run.relay._queues[q].doorbell),
                                     "expected": bar.address_of(vdpa.hw.notify_offset(q))}
                            for q in (0, 1)}
        out["queue_used"] = {str(q): queue_used_address(vdpa.hw, q) for q in (0, 1)}
        out["guest_used"] = {"0": guest.rx.used, "1": guest.tx.used}
        if run.sw is not None:
            out["mediated"] = {str(q): {"iova": run.sw.iovas[q][0], "size": run.sw.iovas[q][1],
                                        "used_offset": ring.used_offset}
                               for q, ring in run.sw.rings.items()}
        # The guest kicks its RX queue after posting buffers, as a driver does.
        os.eventfd_write(guest.kick[0], 1)
        wait_until(fn.clock, lambda: run.relay.stats(0).kicks >= 1, "the RX kick to reach the relay")

        say("READY", phase, token)
        wait_until(fn.clock, lambda: guest.rx.used_idx() == rx_frames,
                   f"{rx_frames} host frames in the guest RX used ring")
        out["rx_used_idx"] = guest.rx.used_idx()
        out["rx"] = guest.received(rx_frames)
        out["rx_call"] = eventfd_count(guest.call[0], WAIT_S)
        if run.sw is not None:
            out["mediated_used_idx"] = run.sw.rings[0].used_idx
        out["tx_frames"] = [f.hex() for f in tx_frames(token, phase)]
        out["tx"] = guest.send(tx_frames(token, phase), vdpa)
        out["tx_call"] = eventfd_count(guest.call[1], WAIT_S)
        out["relay_stats"] = {str(q): relay_stats(run.relay, q) for q in (0, 1)}
        if logging:
            out["dirty_pages_running"] = guest.log.log.dirty_pages()
        out["status_before_close"] = vdpa.hw.status()
    finally:
        rec.phase = f"{phase}:dev_close"
        guest.save_bases(vdpa.dev_close())
        rec.phase = "idle"
        out["mode_after_close"] = vdpa.mode
        out["bases"] = guest.bases
        out["used_at_close"] = {"0": guest.rx.used_idx(), "1": guest.tx.used_idx()}
        out["dma_mappings_after_close"] = sorted([i, s] for i, s in fn.dma_mappings().items())
        out["status_after_close"] = vdpa.hw.status()
        out["used_rings_logged_at_close"] = guest.used_rings_logged()
        if logging:
            out["dirty_pages_closed"] = guest.log.log.dirty_pages()
        out["config_changes"] = guest.config_changes
        guest.close()


def main() -> int:
    results, token, rx_frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out: dict = {"token": token}
    ctx: dict = {}
    status = 0

    def part(name: str, fn, *args, **kwargs) -> bool:
        """Run fn(data, ...) with data = out[name]; a failure is recorded there, not raised."""
        nonlocal status
        data = out.setdefault(name, {})
        started = time.monotonic()
        try:
            fn(data, *args, **kwargs)
            ok = True
        except BaseException:
            data["error"] = traceback.format_exc()
            print(f"part {name} failed:\n{data['error']}", flush=True)
            status = 1
            ok = False
        data["part_seconds"] = round(time.monotonic() - started, 2)
        return ok

    def open_function(data: dict) -> None:
        ctx["fn"] = VfioFunction(ctx["bdf"])
        data["regions"] = sorted(ctx["fn"].regions)

    threads_before = threading.active_count()
    bound = part("bind", part_bind, ctx)
    if bound:
        part("conformance", part_conformance, ctx, results)
    fds_before = fds_open()
    opened = bound and part("open", open_function)
    probed = opened and part("probe", part_probe, ctx)
    for phase, logging in (("direct", False), ("sw", True)):
        if not (probed and part(phase, run_phase, ctx, phase, token, rx_frames, logging=logging)):
            say("SKIP", phase, token)
        if "recorder" in ctx:
            out[phase]["queue_enable_writes"] = [w for w in ctx["recorder"].queue_enable_writes
                                                 if w["phase"].startswith(phase)]
            out[phase]["resets"] = [r for r in ctx["recorder"].resets if r["phase"].startswith(phase)]

    def cleanup(data: dict) -> None:
        fn = ctx.get("fn")
        if "vdpa" in ctx:
            ctx["vdpa"].close()
        elif fn is not None:
            fn.close()
        if fn is not None:
            data["fn_closed"] = fn.closed
            data["dma_mappings"] = sorted([i, s] for i, s in fn.dma_mappings().items())
            data["device_fds"] = [fn.device_fd, fn.group_fd, fn.container_fd]
        for key in ("recorder", "vdpa", "fn"):
            ctx.pop(key, None)
        data["fds_before"], data["fds_after"] = fds_before, fds_open()
        data["threads"] = [t.name for t in threading.enumerate()]
        data["threads_before"], data["threads_after"] = threads_before, threading.active_count()
        if "bdf" in ctx:
            with VfioFunction(ctx["bdf"]) as again:   # VFIO lets one holder at a time: close released it
                data["reopened_ids"] = [again.ids.vendor, again.ids.device]
            data["driver_after_unbind"] = ctx["sysfs"].unbind_vfio(ctx["bdf"]).driver

    part("cleanup", cleanup)
    with open(os.path.join(results, "peer.json"), "w") as f:
        json.dump(out, f, indent=1)
    say("DONE", token, "status", status)
    return status


if __name__ == "__main__":
    sys.exit(main())
