"""`ifcvf bench relay`: used entries relayed per second, C relay vs the Python oracle.

Wall-clock time is read here only.  The Python oracle is tests/relay_oracle.py of
the source tree; from an installed wheel without tests/ its column is left empty.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import struct
import sys
import time
from pathlib import Path

from ifcvf.vring import split_ring_layout

HELP = """\
Measure the SW-assisted live-migration used-ring relay: how many used entries
per second it moves from the mediated ring (where the device writes them) to
the guest's used ring, with dirty logging on.

Set-up per (ring size, chain length): guest memory in a memfd, a split ring
whose descriptors form chains of 1, 2 or 4 device-writable 2 KiB buffers (a
receive buffer pool, as a DPDK/virtio-net guest posts them; --scatter puts each
buffer on its own random page instead), a mediated ring with every slot filled,
a dirty log covering guest memory, and used-ring logging (VHOST_VRING_F_LOG)
on. The "device" publishes a full ring of entries at a time (one 16-bit index
store per lap); the relay is called with max_entries = --batch (default 64),
once per simulated wake-up, until the lap is relayed. Each entry is fully
validated (id, chain walk, every buffer against the memory table and the log)
and every writable buffer's pages are set in the log with atomic OR.

  C         ifc_relay_used, the function the C notify loop calls, here called
            through cffi: the figure includes one Python->C crossing (GIL
            released and re-taken) per batch
  Python    the pure-Python oracle of the same semantics (tests/relay_oracle.py)

Figures are medians of --repeat runs of --seconds each.  The targets: at least
150 M entries/s for 1-descriptor chains on ring 1024 (100 GbE at 64 B is
148.8 Mpps) and at least 80x the oracle.

--json FILE writes {"c_entries_per_s", "python_entries_per_s" (both for
1-descriptor chains, ring 1024, logging on, the given batch), "batch", "matrix":
[{"ring", "chain", "c_entries_per_s", "python_entries_per_s"}, ...], ...}.
The machine may be shared: keep runs short and quote medians.
"""

HEADLINE = (1024, 1)     # ring size, chain length of the json headline figures
BUFFER = 2048
POOL_GPA = 1 << 20


def register(subparsers) -> None:
    p = subparsers.add_parser("relay", help="used-ring relay: entries/s, C vs Python oracle",
                              description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,1024,4096", help="ring sizes (default 256,1024,4096)")
    p.add_argument("--chains", default="1,2,4", help="descriptors per chain (default 1,2,4)")
    p.add_argument("--batch", type=int, default=64,
                   help="entries per relay call (default 64; at most the ring size)")
    p.add_argument("--repeat", type=int, default=5, help="repetitions, median quoted (default 5)")
    p.add_argument("--seconds", type=float, default=0.1,
                   help="wall seconds per repetition (default 0.1)")
    p.add_argument("--scatter", action="store_true",
                   help="each buffer on its own random page (worst case for the log)")
    p.add_argument("--no-python", action="store_true", help="skip the Python oracle")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    p.set_defaults(func=cmd_relay)


def load_oracle():
    path = Path(__file__).resolve().parents[3] / "tests" / "relay_oracle.py"   # the repository root
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("ifcvf_bench_relay_oracle", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


class Setup:
    """One guest + mediated ring + log for a (ring size, chain length) pair."""

    def __init__(self, size: int, chain: int, scatter: bool, seed: int = 1):
        from hal.memory import HostMemory
        from ifcvf.vhost.protocol import log_size
        from ifcvf.relay import MediatedRing

        self.size, self.chain = size, chain
        self.desc_gpa = 0x1000
        _, self.avail_gpa, self.used_gpa, _ = split_ring_layout(self.desc_gpa, size)
        pool_pages = 2 * size if scatter else size * BUFFER // 4096 + 1
        self.mem_size = POOL_GPA + pool_pages * 4096
        self.memory = HostMemory(self.mem_size, "bench-guest")
        self.mediated = MediatedRing(size)
        self.log = bytearray(log_size(self.mem_size))
        rnd = random.Random(seed)
        pages = rnd.sample(range(pool_pages), size) if scatter else None
        view = self.memory.view
        for d in range(size):
            addr = POOL_GPA + (pages[d] * 4096 if scatter else d * BUFFER)
            last = d % chain == chain - 1
            flags = 2 if last else 2 | 1          # WRITE, plus NEXT inside a chain
            struct.pack_into("<QIHH", view, self.desc_gpa + 16 * d, addr, BUFFER, flags,
                             0 if last else d + 1)
        heads = size // chain
        for s in range(size):
            self.mediated.put_used(s, (s % heads) * chain, 64)

    def c_queue(self):
        from ifcvf.relay import MemoryTable, RelayQueue

        self.table = MemoryTable([(0, self.mem_size, self.memory.address)])
        return RelayQueue(self.table, self.size, self.desc_gpa, self.avail_gpa, self.used_gpa,
                          self.mediated, log=self.log, log_used_gpa=self.used_gpa,
                          last_idx=self.mediated.used_idx)

    def oracle_queue(self, oracle):
        mem = oracle.Memory([(0, self.memory.view, self.memory.address)])
        m = self.mediated
        return oracle.OracleQueue(
            mem, self.size, self.desc_gpa, self.avail_gpa, self.used_gpa,
            (m.memory.view, m.avail_offset, m.used_offset, m.address),
            log=self.log, log_used_gpa=self.used_gpa, last_idx=m.used_idx)

    def close(self) -> None:
        self.mediated.close()
        self.memory.close()


def measure_c(setup: Setup, batch: int, seconds: float) -> float:
    from ifcvf._native import ffi, lib

    queue = setup.c_queue()
    relay, q = lib.ifc_relay_used, queue.cdata
    res = ffi.new("struct ifc_relay_result *")
    idx = ffi.cast("uint16_t *", setup.mediated.used_address + 2)
    size = setup.size
    calls = (size + batch - 1) // batch
    laps = max(1, 16384 // size)        # laps between clock reads
    value = idx[0]
    entries, clock = 0, time.perf_counter
    start = clock()
    deadline = start + seconds
    while True:
        for _ in range(laps):
            value = (value + size) & 0xFFFF
            idx[0] = value                  # the device publishes a lap: one 16-bit store
            for _ in range(calls):
                relay(q, batch, res)
        entries += size * laps
        if clock() >= deadline:
            break
    elapsed = clock() - start
    if res.rc < 0 or queue.last_idx != idx[0]:
        raise RuntimeError(f"relay failed during the benchmark: rc {res.rc}, reason {res.reason}")
    queue.close()
    return entries / elapsed


def measure_python(setup: Setup, oracle, batch: int, seconds: float) -> float:
    queue = setup.oracle_queue(oracle)
    idx = setup.mediated
    entries, clock = 0, time.perf_counter
    start = clock()
    deadline = start + seconds
    while clock() < deadline:
        if queue.last == idx.used_idx:
            idx.used_idx = idx.used_idx + setup.size
        res = queue.relay(batch)
        if res.rc < 0:
            raise RuntimeError(f"oracle failed during the benchmark: reason {res.reason}")
        entries += res.count
    return entries / (clock() - start)


def median_of(fn, repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


def cmd_relay(args) -> int:
    from rich.console import Console
    from rich.table import Table

    sizes = [int(s) for s in args.sizes.split(",")]
    chains = [int(c) for c in args.chains.split(",")]
    oracle = None if args.no_python else load_oracle()
    console = Console()
    if oracle is None and not args.no_python:
        console.print("[yellow]tests/relay_oracle.py not found: no Python column[/]")
    pairs = [(s, c) for s in sizes for c in chains]
    if HEADLINE not in pairs:
        pairs.append(HEADLINE)
    rows = []
    for size, chain in pairs:
        batch = min(args.batch, size)
        setup = Setup(size, chain, args.scatter)
        try:
            measure_c(setup, batch, args.seconds / 5)        # warm-up, not counted
            c = median_of(lambda: measure_c(setup, batch, args.seconds), args.repeat)
            py = (median_of(lambda: measure_python(setup, oracle, batch, args.seconds), args.repeat)
                  if oracle else None)
        finally:
            setup.close()
        rows.append(dict(ring=size, chain=chain, batch=batch, c_entries_per_s=c,
                         python_entries_per_s=py))

    table = Table(title=f"used-ring relay, dirty logging on, batch {args.batch}, "
                        f"{'scattered' if args.scatter else 'pooled'} 2 KiB buffers "
                        f"(median of {args.repeat} x {args.seconds:g} s)")
    for col in ("ring", "chain", "C M entries/s", "C ns/entry", "Python M entries/s", "C / Python"):
        table.add_column(col, justify="right")
    for r in rows:
        py = r["python_entries_per_s"]
        table.add_row(str(r["ring"]), str(r["chain"]), f"{r['c_entries_per_s'] / 1e6:.1f}",
                      f"{1e9 / r['c_entries_per_s']:.2f}",
                      "-" if py is None else f"{py / 1e6:.3f}",
                      "-" if py is None else f"{r['c_entries_per_s'] / py:.0f}x")
    console.print(table)

    head = next(r for r in rows if (r["ring"], r["chain"]) == HEADLINE)
    c, py = head["c_entries_per_s"], head["python_entries_per_s"]
    verdict = [f"ring 1024, 1-descriptor chains: C {c / 1e6:.1f} M entries/s "
               f"({'meets' if c >= 150e6 else 'misses'} the 150 M target)"]
    if py:
        verdict.append(f"{c / py:.0f}x the Python oracle ({'meets' if c / py >= 80 else 'misses'} 80x)")
    console.print("; ".join(verdict))
    if args.json:
        args.json.write_text(json.dumps(dict(
            c_entries_per_s=c, python_entries_per_s=py, batch=min(args.batch, HEADLINE[0]),
            ring=HEADLINE[0], chain=HEADLINE[1], logging=True, log_used_ring=True,
            layout="scattered" if args.scatter else "pooled", repeat=args.repeat,
            seconds=args.seconds, matrix=rows), indent=2) + "\n")
    return 0
