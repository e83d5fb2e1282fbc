"""The simulator's C (csrc/sim/: simdp.c, guest_ring.c, guest_frames.c, qemu_log.c) under ASan + UBSan.

The hostile-ring, property, engine and dirty-logging tests run in a child
process against sanitized builds of sim._native and ifcvf._native (tests/sanitize/relay_sanitized.py does the
build and the run); any out-of-bounds access or undefined behaviour fails it.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "sanitize" / "relay_sanitized.py"
TESTS = ["tests/property/test_engine_props.py", "tests/sim/test_engine_faults.py",
         "tests/sim/test_engine_rx.py", "tests/sim/test_engine_tx.py",
         "tests/sim/test_dirty_logging.py", "tests/sim/test_wire.py",
         # the guest's ring and frame kernels (csrc/guest_ring.c, guest_frames.c) and
         # the whole stack, one direction at a time, through the RX FIFO in C
         "tests/sim/test_traffic.py", "tests/sim/test_guest_datapath.py",
         "tests/sim/test_guest_bench.py",
         # QEMU's fetch-and-clear of the dirty log (csrc/sim/qemu_log.c)
         "tests/sim/test_qemu_log.py"]


def load_script():
    spec = importlib.util.spec_from_file_location("relay_sanitized", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_datapath_c_is_clean_under_asan_and_ubsan(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    for lib in ("libasan.so", "libubsan.so"):
        path = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True,
                              text=True).stdout.strip()
        if not os.path.isabs(path):
            pytest.skip(f"gcc has no {lib} (install libasan/libubsan for gcc)")
    sanitize = load_script()
    sos = sanitize.build(tmp_path)
    done = sanitize.run(sos, ["-q", "-p", "no:cacheprovider", *[str(ROOT / t) for t in TESTS]],
                        timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert not sanitize.REPORT.search(out), out[-4000:]
    assert " passed" in out
