"""Same seed, same trace digest: across processes and hash seeds, with traffic flowing."""
from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
from sim.testing import enginebench
from sim.config import IfcvfConfig
cfg = IfcvfConfig(queue_pairs=1, max_queue_size=1024, dirty_log_skip_fraction=0.25)
for mode, size in (("loop", 64), ("loop", 1518), ("rx", 64)):
    r = enginebench.run(mode, size, 50.0, config=cfg)
    print(mode, size, r["frames"], r["trace_events"], r["digest"])
"""


def run(hashseed: str) -> str:
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, check=True, timeout=300)
    return out.stdout


def test_two_processes_print_the_same_digests():
    first, second = run("1"), run("987")
    assert first == second
    lines = first.splitlines()
    assert len(lines) == 3 and all(int(line.split()[2]) > 100 for line in lines)
