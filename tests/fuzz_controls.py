"""Negative controls for the fuzzing engine (tests/unit/test_fuzz.py): targets
that fail, hang and crash on inputs the engine must find within seconds."""
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
