"""Structure-aware fuzzing (``ifcvf fuzz``).

Each target is a hypothesis ``@given`` property: its strategies build
structured inputs (vhost-user messages with real fds, memory tables, ring
addresses, hostile rings, scenario files) and its body asserts what must hold.
The engine (``engine.py``) drives the property's ``fuzz_one_input`` from
atheris (coverage-guided libFuzzer) in a child process, so a native crash or a
hang costs that child only: the parent counts it and starts another.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    module: str          # holds ``PROPERTY``, a hypothesis @given function
    description: str
    instrument: tuple[str, ...] = ("ifcvf", "sim", "hal")
    #: Run against the ASan + UBSan build of the native modules (sanitized.py):
    #: an out-of-bounds access or undefined behaviour in C is a crash.
    sanitized: bool = False


TARGETS = {t.name: t for t in [
    Target("codec", "ifcvf.tools.fuzz.codec",
           "vhost-user framing and codec: messages (valid, mutated, random) split into chunks "
           "with real fds over a socketpair, read by MessageReader and parsed"),
    Target("backend", "ifcvf.tools.fuzz.backend",
           "the back-end state machine on a simulated VF: sequences of valid, malformed and "
           "out-of-order messages with real memfds, eventfds, memory tables, ring addresses and logs"),
    Target("relay", "ifcvf.tools.fuzz.relay",
           "the C used-ring relay on hostile rings (loops, out-of-range ids and addresses, long "
           "chains, racing indices) against the Python oracle (needs the source tree's tests/)"),
    Target("relay-asan", "ifcvf.tools.fuzz.relay",
           "the relay target against the AddressSanitizer + UBSan build of the C code: any "
           "out-of-bounds access or undefined behaviour on hostile rings is a crash (needs gcc's "
           "libasan and the source tree's csrc/ and tests/)", sanitized=True),
    Target("engines", "ifcvf.tools.fuzz.engines",
           "the model's ring engines (sim._native) on random descriptor tables: every access "
           "stays inside the mapping (needs the source tree's tests/)"),
    Target("scenario", "ifcvf.tools.fuzz.scenario",
           "scenario TOML files: valid, mistyped, out-of-range and unknown keys; only a "
           "ScenarioError naming the problem"),
    Target("sweep", "ifcvf.tools.fuzz.sweep",
           "sweep TOML files: bad keys and value types, huge grids, non-UTF-8, path tricks in "
           "`base`; only a ScenarioError naming the file"),
]}
