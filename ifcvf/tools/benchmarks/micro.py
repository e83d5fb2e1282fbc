"""The guest side on its own, in frames per wall-clock second: the C kernels per frame
(fill, check, the guest's ring work) and the guest model against a device that
costs nothing (``sim.testing.guest_testdev.NullDevice``).

Wall-clock time is read here, never in the model.
"""
from __future__ import annotations

import os
import time

from ifcvf.tools.benchmarks.measure import rate
from ifcvf.tools.benchmarks.stack import frame_size


def _features() -> int:
    from sim import virtio_regs as vr
    return vr.feature_mask(vr.F_VERSION_1, vr.F_NET_MRG_RXBUF, vr.F_EVENT_IDX,
                           vr.F_INDIRECT_DESC)


def micro_kernels(size: int, frames: int = 200_000, batch: int = 64) -> dict:
    """Frames per wall second of the C kernels: fill (generator), check (sink)."""
    from sim.traffic import Checker, SizeDist, Stream
    stream = Stream(SizeDist.fixed(size), flows=16)
    checker = Checker(16)
    rounds = max(1, frames // batch)
    fill = check = 0.0
    clock = time.perf_counter
    for _ in range(rounds):
        t0 = clock()
        b = stream.batch(batch)          # a fresh FrameBatch, as the generator makes them
        t1 = clock()
        checker.check(b)
        fill += t1 - t0
        check += clock() - t1
    assert checker.counts().good == rounds * batch
    return {"fill": rate(rounds * batch, fill), "check": rate(rounds * batch, check)}


def micro_rings(size: int, frames: int = 200_000, batch: int = 64, queue_size: int = 256) -> dict:
    """Frames per wall second of the guest's ring work in C, a batch per call."""
    from hal.memory import HostMemory
    from sim._native import lib
    from sim.guest import GuestNet
    from sim.testing.guest_testdev import NullDevice
    from sim.world import World
    world = World(0)
    with HostMemory(64 << 20, "bench-guest") as mem:
        guest = GuestNet(world, mem, features=_features(), queue_size=queue_size,
                         tx_sizes=size, rx_buffer_size=2048, tx_buffer_size=2048)
        NullDevice(world, guest, rx_frame_size=size)     # used rings written once
        rx, tx = guest.queues[0], guest.queues[1]
        used_idx = memoryview(mem.mmap)[rx.layout.used + 2:rx.layout.used + 4].cast("H")
        tx_used_idx = memoryview(mem.mmap)[tx.layout.used + 2:tx.layout.used + 4].cast("H")
        rounds = max(1, frames // batch)
        rx_c, tx_c, ck, st, stream = rx.c, tx.c, guest.checker.c, rx.stats, tx.stream.c
        t0 = time.perf_counter()
        for _ in range(rounds):
            used_idx[0] = (used_idx[0] + batch) & 0xFFFF        # the device completed a batch
            lib.ifc_gvq_rx(rx_c, batch, ck, st)
            lib.ifc_gvq_refill(rx_c, queue_size)
            lib.ifc_gvq_publish(rx_c)
        t1 = time.perf_counter()
        for _ in range(rounds):
            lib.ifc_gvq_tx_reclaim(tx_c)
            lib.ifc_gvq_tx_post(tx_c, batch, stream)
            lib.ifc_gvq_publish(tx_c)
            tx_used_idx[0] = (tx_used_idx[0] + batch) & 0xFFFF  # the device sent them
        t2 = time.perf_counter()
        good = guest.rx_counts().good
        used_idx.release()
        tx_used_idx.release()
        assert good == rounds * batch, (good, rounds * batch)
    return {"guest_rx_ring": rate(rounds * batch, t1 - t0),
            "guest_tx_ring": rate(rounds * batch, t2 - t1)}


def micro_guest_model(size: int, sim_us: float = 2000.0, pairs: int = 1,
                      queue_size: int = 256, batch: int = 64) -> dict:
    """The whole guest model (both directions at 100 Gb/s) against a device that costs nothing."""
    from hal.memory import HostMemory
    from sim.guest import GuestCosts, GuestNet
    from sim.testing.guest_testdev import NullDevice
    from sim.world import World
    world = World(0)
    fds: list[int] = []
    with HostMemory(64 << 20, "bench-guest") as mem:
        # Cheap guest CPU, so the guest is not what limits the frame count here.
        costs = GuestCosts(irq_ns=100, poll_ns=50, rx_frame_ns=5, tx_batch_ns=50, tx_frame_ns=5,
                           kick_ns=0)
        guest = GuestNet(world, mem, features=_features(), queue_pairs=pairs,
                         queue_size=queue_size, tx_rate_gbps=100.0 * pairs, tx_sizes=size,
                         rx_buffer_size=2048, tx_buffer_size=2048, costs=costs,
                         napi_budget=batch, tx_batch=batch)
        dev = NullDevice(world, guest, rx_frame_size=size, batch=batch)
        try:
            for q in range(guest.num_queues):
                kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                fds += [kick, call]
                guest.attach(q, kick, call)
                dev.attach(q, kick, call)
            guest.start()
            dev.start()
            t0 = time.perf_counter()
            world.run_until(world.cycles(sim_us * 1000))
            wall = time.perf_counter() - t0
        finally:
            for fd in fds:
                os.close(fd)
        frames = guest.rx_counts().frames + guest.tx_frames()
        bad = guest.rx_counts().corrupted
        guest.detach()
    if bad:
        raise RuntimeError(f"guest model benchmark: {bad} corrupted frames")
    return {"guest_model": rate(frames, wall), "guest_model_sim_to_wall": sim_us / 1e6 / wall}


def run_micro(labels: list[int], progress=None, frames: int = 200_000) -> dict:
    out = {}
    for label in labels:
        size = frame_size(label)
        if progress:
            progress(f"guest side, {label} B")
        row = {}
        row.update(micro_kernels(size, frames))
        row.update(micro_rings(size, frames))
        # simulated time for about `frames` frames each way at line rate
        sim_us = max(50.0, frames * (size + 20) * 8 / 100.0 / 1000 / 4)
        row.update(micro_guest_model(size, sim_us=sim_us))
        out[str(label)] = row
    return out
