"""Issue 12: resident memory follows the pages the guest used, not its RAM size,
and the pre-copy costs what QEMU's stream costs (zero pages are 9-byte records).

Each migration runs in a child process (`ifcvf sim run --json`) that reports
its own peak resident set.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USED_MIB = 48
MIB = 1 << 20


def scenario(tmp_path: Path, ram_mib: int, used_mib: int, bandwidth_mib_s: float = 2500.0) -> Path:
    path = tmp_path / f"ram-{ram_mib}-{used_mib}.toml"
    path.write_text(f"""
name = "ram-{ram_mib}"
kind = "migration"
seed = 3
[driver]
guest_memory_mib = {ram_mib}
guest_used_fraction = {used_mib / ram_mib}
[traffic]
rx_pps = 20000
tx_pps = 20000
warmup_us = 100
duration_us = 200
[migration]
bandwidth_mib_s = {bandwidth_mib_s}
""")
    return path


# The child reports its own peak (VmHWM, per address space).  Not the rusage of
# wait4: Linux carries ru_maxrss across exec, so it would include the RSS of the
# forked copy of this (large) test process.
CHILD = """
import sys
from ifcvf.tools.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print("peak", int(hwm.split()[1]) * 1024, file=sys.stderr)
sys.exit(rc)
"""


def run_child(path: Path, tmp_path: Path) -> tuple[dict, int]:
    """The run's JSON and the child's peak resident memory in bytes."""
    out = tmp_path / (path.stem + ".json")
    proc = subprocess.run([sys.executable, "-c", CHILD, "sim", "run", str(path), "--json", str(out)],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(proc.stderr.strip().splitlines()[-1].split()[1])
    return json.loads(out.read_text()), peak


def test_a_16_gib_guest_costs_what_it_used_not_its_size(tmp_path):
    small, small_rss = run_child(scenario(tmp_path, 1024, USED_MIB), tmp_path)
    big, big_rss = run_child(scenario(tmp_path, 16384, USED_MIB), tmp_path)
    for result in (small, big):
        assert result["ok"], result["problems"]
        assert result["invariants"]["memory_equal"]
    # Fully resident, the 16 GiB pair of RAMs would be 30 GiB more; what may
    # grow is per-page bookkeeping (the page list, the log): a few tens of MiB.
    assert big_rss - small_rss < 64 * MIB, (small_rss / MIB, big_rss / MIB)
    assert big_rss < 2 * USED_MIB * MIB + 400 * MIB, big_rss / MIB


def test_the_first_pass_costs_the_stream_bytes_at_the_bandwidth(tmp_path):
    bandwidth = 1000.0
    result, _ = run_child(scenario(tmp_path, 256, 64, bandwidth), tmp_path)
    first = result["migration"]["per_iteration"][0]
    pages = 256 * MIB // 4096
    assert first["pages_copied"] == pages
    used_pages = 64 * MIB // 4096
    # Every page the guest never wrote is a zero page; what it used (a quarter of
    # the RAM beyond its rings and buffers, and those as it ran) is sent whole.
    normal = pages - first["zero_pages"]
    assert abs(normal - used_pages) < 512, normal
    assert first["stream_bytes"] == normal * (8 + 4096) + first["zero_pages"] * 9
    seconds = first["stream_bytes"] / (bandwidth * MIB)
    assert first["duration_us"] == pytest.approx(seconds * 1e6, rel=0.01)
