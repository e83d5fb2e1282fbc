"""The fuzzing engine: atheris (libFuzzer) drives a hypothesis property.

The parent (``run``) starts a child process per target with the remaining
budget; the child instruments our packages, hands libFuzzer a callback that
feeds each input to the property's ``fuzz_one_input`` and records, without
stopping, every exception the property raises (a failure, keyed by its type
and where it was raised).  A hang (libFuzzer's per-input ``-timeout``) or a
native crash kills the child: the parent counts it, keeps the input libFuzzer
wrote, and starts a new child for what is left of the budget.

Counters travel through a small stats file the child rewrites in place
(libFuzzer ends the process with ``exit()``, so nothing runs at the end).
"""
from __future__ import annotations

import json
import re
import os
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ifcvf.tools.fuzz import TARGETS, Target

_STATS = struct.Struct("<QQ")       # cases run, cases that failed
ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Failure:
    signature: str
    kind: str                # "exception", "hang", "crash"
    message: str
    count: int = 1
    input_hex: str = ""      # the libFuzzer input (feed it to PROPERTY.hypothesis.fuzz_one_input)
    detail: str = ""


@dataclass
class Result:
    name: str
    cases: int = 0
    seconds: float = 0.0
    crashes: int = 0
    hangs: int = 0
    failures: list[Failure] = field(default_factory=list)
    children: int = 0

    @property
    def unique_failures(self) -> int:
        return len(self.failures)

    @property
    def cases_per_second(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict:
        return {"name": self.name, "cases": self.cases, "seconds": round(self.seconds, 3),
                "crashes": self.crashes, "hangs": self.hangs,
                "unique_failures": self.unique_failures,
                "cases_per_second": round(self.cases_per_second, 1),
                "failures": [asdict(f) for f in self.failures]}


def signature_of(exc: BaseException) -> tuple[str, str]:
    """(signature, where): the exception type and the innermost frame in our code."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if any(f"/{p}/" in f.filename for p in ("ifcvf", "sim", "hal", "tests"))
            and "/fuzz/engine.py" not in f.filename]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    loc = f"{Path(where.filename).name}:{where.lineno} in {where.name}" if where else "?"
    return f"{type(exc).__name__} at {loc}", loc


# --- the child -----------------------------------------------------------------------

def child_main(argv: list[str]) -> None:
    module_name, instrument, budget, timeout, stats_path, findings_path, artifacts = argv
    import atheris

    from ifcvf.tools.fuzz.sanitized import check_installed, install

    # A sanitized target: its native modules replace the in-tree ones before
    # anything imports those (no-op otherwise).
    sanitized = install()
    sys.path.insert(0, str(ROOT / "tests"))
    with atheris.instrument_imports(include=instrument.split(",")):
        module = __import__(module_name, fromlist=["PROPERTY"])
    check_installed(sanitized)
    fuzz_one_input = module.PROPERTY.hypothesis.fuzz_one_input
    counters = [0, 0]
    seen: set[str] = set()
    stats_fd = os.open(stats_path, os.O_RDWR | os.O_CREAT, 0o600)
    findings = open(findings_path, "a")

    def one_input(data: bytes) -> None:
        try:
            if fuzz_one_input(data) is not None:   # None: the input drew no valid example
                counters[0] += 1
                os.pwrite(stats_fd, _STATS.pack(*counters), 0)
        except Exception as exc:  # a finding: record it and keep fuzzing
            counters[0] += 1
            counters[1] += 1
            os.pwrite(stats_fd, _STATS.pack(*counters), 0)
            sig, _ = signature_of(exc)
            if sig not in seen:
                seen.add(sig)
                findings.write(json.dumps({
                    "signature": sig, "kind": "exception",
                    "message": f"{type(exc).__name__}: {exc}"[:2000],
                    "input_hex": data.hex(),
                    "detail": "".join(traceback.format_exception(exc))[-4000:]}) + "\n")
                findings.flush()
            else:
                findings.write(json.dumps({"signature": sig, "repeat": True}) + "\n")
                findings.flush()

    atheris.Setup([sys.argv[0], f"-max_total_time={budget}", f"-timeout={timeout}",
                   "-max_len=16384", "-rss_limit_mb=4096", f"-artifact_prefix={artifacts}/",
                   "-print_final_stats=0", "-close_fd_mask=0"], one_input)
    atheris.Fuzz()


# --- the parent -----------------------------------------------------------------------

def run(target: "str | Target", budget: float, *, hang_timeout: int = 10,
        python: str = sys.executable, log=None) -> Result:
    """Fuzz ``target`` (a name in TARGETS, or a Target) for ``budget`` seconds of
    wall time (child start-up included)."""
    if isinstance(target, str):
        if target not in TARGETS:
            raise KeyError(f"unknown fuzz target {target!r}; targets: {', '.join(TARGETS)}")
        target = TARGETS[target]
    name = target.name
    result = Result(name)
    by_sig: dict[str, Failure] = {}
    with tempfile.TemporaryDirectory(prefix=f"ifcvf-fuzz-{name}-") as tmp:
        tmp = Path(tmp)
        child_env = dict(os.environ, PYTHONHASHSEED="0")
        if target.sanitized:
            # Built per run (a few seconds, not counted in the budget): always the
            # C that is in the tree now.
            from ifcvf.tools.fuzz import sanitized

            (tmp / "sanitized").mkdir()
            child_env.update(sanitized.environment(sanitized.build(tmp / "sanitized"), abort=True))
        start = time.monotonic()
        while True:
            left = budget - (time.monotonic() - start)
            if left < 1 and result.children:
                break
            result.children += 1
            stats = tmp / f"stats.{result.children}"
            findings = tmp / f"findings.{result.children}"
            artifacts = tmp / f"artifacts.{result.children}"
            artifacts.mkdir()
            stats.write_bytes(_STATS.pack(0, 0))
            findings.touch()
            cmd = [python, "-m", "ifcvf.tools.fuzz.engine", "--child", target.module,
                   ",".join(target.instrument),
                   str(max(1, int(left))), str(hang_timeout), str(stats), str(findings),
                   str(artifacts)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, env=child_env, cwd=ROOT,
                                      timeout=max(1, left) + hang_timeout + 60)
                rc, err = done.returncode, done.stderr
            except subprocess.TimeoutExpired as exc:
                rc, err = -9, (exc.stderr or b"").decode(errors="replace") if isinstance(
                    exc.stderr, bytes) else (exc.stderr or "")
            cases, failed = _STATS.unpack(stats.read_bytes()[:_STATS.size])
            result.cases += cases
            _merge_findings(findings, by_sig, result)
            if rc != 0:
                kind = "hang" if "libFuzzer: timeout" in err or rc == -9 else "crash"
                if kind == "hang":
                    result.hangs += 1
                else:
                    result.crashes += 1
                crash_input = next(iter(sorted(artifacts.iterdir())), None)
                sig = f"{kind}: {_native_reason(err)}"
                if sig in by_sig:
                    by_sig[sig].count += 1
                else:
                    by_sig[sig] = Failure(sig, kind, _native_reason(err),
                                          input_hex=crash_input.read_bytes().hex() if crash_input else "",
                                          detail=_crash_detail(err))
                    result.failures.append(by_sig[sig])
                if log:
                    log(f"{name}: child {result.children} ended ({kind}); restarting")
            if cases == 0 and rc == 0 and result.children >= 1 and "Traceback" in err:
                raise RuntimeError(f"fuzz target {name} did not start:\n{err[-3000:]}")
    result.seconds = time.monotonic() - start
    return result


def _merge_findings(path: Path, by_sig: dict[str, Failure], result: Result) -> None:
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        sig = rec["signature"]
        result.crashes += 1
        if sig in by_sig:
            by_sig[sig].count += 1
            continue
        if rec.get("repeat"):
            continue
        by_sig[sig] = Failure(sig, rec["kind"], rec["message"], input_hex=rec["input_hex"],
                              detail=rec["detail"])
        result.failures.append(by_sig[sig])


def _crash_detail(err: str) -> str:
    """A sanitizer's report from its first line (the faulting frames come first),
    else the end of what the child printed."""
    m = re.search(r"^.*(?:ERROR: AddressSanitizer|runtime error:).*$", err, re.M)
    return err[m.start():m.start() + 4000] if m else err[-4000:]


def _native_reason(err: str) -> str:
    """The line that says why a child died, without what differs between runs
    (pids, addresses), so one bug is one failure however often it is hit."""
    for line in err.splitlines():
        if "ERROR: libFuzzer" in line or "ERROR: AddressSanitizer" in line or "runtime error" in line:
            line = re.sub(r"^==\d+==\s*", "", line.strip())
            return re.sub(r"\s+(?:on (?:unknown )?address|at pc|bp|sp) 0x[0-9a-f]+", "", line)[:300]
    tail = [ln for ln in err.splitlines() if ln.strip()]
    return tail[-1][:300] if tail else "the child died without a message"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
