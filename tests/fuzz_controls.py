"""Negative controls for the fuzzing engine (tests/unit/test_fuzz.py): targets
that fail, hang, crash and overflow a C buffer on inputs the engine must find
within seconds."""
import ctypes
import os
import time

from hypothesis import HealthCheck, given, settings, strategies as st

MODE = os.environ.get("IFCVF_FUZZ_CONTROL", "fail")


@settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 15), st.integers(0, 3))
def PROPERTY(x, y):
    if x >= 2:
        return
    if MODE == "fail":
        assert y != 1, "found y == 1"
        if y == 2:
            raise KeyError("y == 2")
    elif MODE == "hang":
        while True:   # the engine's per-input timeout must end this
            time.sleep(0.05)
    elif MODE == "crash":
        ctypes.string_at(0)   # SIGSEGV: a native crash
    elif MODE == "oob":
        # The C marks page 96 of a log it is told is 4096 bytes: bit 0 of byte 12
        # of a 9-byte buffer, inside the allocator's slack, which only a sanitized
        # build (PYTHONMALLOC=malloc, redzones) reports.
        from ifcvf._native import ffi, lib

        buf = bytearray(9)
        lib.ifc_log_mark(ffi.from_buffer(buf), 4096, 96 * 4096, 1)
