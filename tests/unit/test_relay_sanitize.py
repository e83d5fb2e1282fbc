"""The relay tests against an AddressSanitizer + UBSan build of the C code.

Builds both native modules (csrc/driver/, csrc/sim/) with IFCVF_SANITIZE=1
into a temporary directory (the in-tree extensions are left alone) and runs the relay property and unit tests in a child
process with the sanitizer runtimes preloaded; see tests/sanitize/relay_sanitized.py,
which CI can also run on its own.  A canary first proves the instrumentation is
live in each module: an overflow the uninstrumented build would not notice
must be reported.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "sanitize" / "relay_sanitized.py"


def load_script():
    spec = importlib.util.spec_from_file_location("relay_sanitized", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sanitize = load_script()


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    for lib in ("libasan.so", "libubsan.so"):
        path = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True,
                              text=True).stdout.strip()
        if not os.path.isabs(path):
            pytest.skip(f"gcc has no {lib} (install libasan/libubsan for gcc)")
    return sanitize.build(tmp_path_factory.mktemp("sanitized"))


def output_of(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


CANARIES = {
    # A log size that lies: page 96 is bit 0 of byte 12, past the buffer.
    "ifcvf._native": "lib.ifc_log_mark(ffi.from_buffer(buf), 4096, 96 * 4096, 1)",
    # QEMU's fetch-and-clear told the 9-byte log has 16 (its word loop reads past it).
    "sim._native": "lib.ifc_log_fetch_clear(ffi.from_buffer(buf), 16, ffi.new('uint8_t[]', 16))",
}


@pytest.mark.parametrize("module", sorted(CANARIES))
def test_the_instrumentation_is_live(sanitized, tmp_path, module):
    canary = tmp_path / "test_canary.py"
    canary.write_text(textwrap.dedent(f"""
        from {module} import ffi, lib

        def test_overflow():
            buf = bytearray(9)   # malloc'd (PYTHONMALLOC=malloc): a redzone follows
            {CANARIES[module]}
    """))
    done = sanitize.run(sanitized, ["-q", "-p", "no:cacheprovider", str(canary)], timeout=120)
    assert done.returncode != 0
    assert "heap-buffer-overflow" in output_of(done)


def test_relay_tests_are_clean_under_asan_and_ubsan(sanitized):
    done = sanitize.run(sanitized, ["-q", "-p", "no:cacheprovider", *sanitize.DEFAULT_TESTS],
                        timeout=300)
    out = output_of(done)
    assert done.returncode == 0, out[-4000:]
    assert not sanitize.REPORT.search(out), out[-4000:]
    assert " passed" in out
