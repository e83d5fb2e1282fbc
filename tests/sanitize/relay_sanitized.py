"""Run tests against AddressSanitizer + UBSan builds of both native modules.

    python tests/sanitize/relay_sanitized.py [--keep DIR] [TEST ...]

Builds ifcvf._native (csrc/driver/) and sim._native (csrc/sim/) with
IFCVF_SANITIZE=1 into a temporary directory (the in-tree ifcvf/_native*.so and
sim/_native*.so are not touched), then runs pytest (by default on the relay
tests) in a child process that preloads the ASan and UBSan runtimes (CPython
itself is not instrumented, so ASan must be loaded first) and imports the
sanitized modules as ``ifcvf._native`` and ``sim._native`` before any test
module does.  PYTHONMALLOC=malloc puts
every Python buffer (the tests' guest memory, logs, rings) on the instrumented
malloc, so an out-of-bounds access by C is reported, not silently absorbed.
detect_leaks=0 because CPython leaks by design at exit.

Exit status 0 only if the build succeeded, pytest passed and neither sanitizer
printed a report.  CI: ``.venv/bin/python tests/sanitize/relay_sanitized.py``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:     # run as a script: the project is importable from here
    sys.path.insert(0, str(ROOT))

from ifcvf.tools.fuzz.sanitized import REPORT, build, environment  # noqa: E402

DEFAULT_TESTS = ["tests/property/test_relay_diff.py", "tests/unit/test_relay.py",
                 "tests/unit/test_relay_notify.py"]

BOOTSTRAP = r"""
import sys
from ifcvf.tools.fuzz.sanitized import check_installed, install
paths = install()
import pytest
code = pytest.main(sys.argv[1:])
check_installed(paths)
sys.exit(code)
"""


def sanitizer_env(sos: dict[str, pathlib.Path]) -> dict:
    return dict(
        os.environ, **environment(sos),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        HYPOTHESIS_PROFILE=os.environ.get("HYPOTHESIS_PROFILE", "ci"),
    )


def run(sos: dict[str, pathlib.Path], args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """pytest (args) in a child with the sanitizers loaded and the modules of ``sos`` imported.

    --capture=sys: pytest's default fd capture would swallow a sanitizer report,
    which the runtime writes to fd 2 just before it ends the process."""
    return subprocess.run([sys.executable, "-c", BOOTSTRAP, "--capture=sys", *args], cwd=ROOT,
                          env=sanitizer_env(sos), capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", metavar="DIR", help="build into DIR and keep it")
    parser.add_argument("tests", nargs="*", default=DEFAULT_TESTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ifcvf-san-") as tmp:
        outdir = pathlib.Path(args.keep or tmp)
        outdir.mkdir(parents=True, exist_ok=True)
        sos = build(outdir)
        done = run(sos, ["-q", "-p", "no:cacheprovider", *args.tests])
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        if REPORT.search(done.stdout + done.stderr):
            print("sanitizer report found", file=sys.stderr)
            return 1
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
