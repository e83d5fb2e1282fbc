"""Run the relay tests against an AddressSanitizer + UBSan build of ifcvf._native.

    python tests/sanitize/relay_sanitized.py [--keep DIR] [TEST ...]

Builds csrc/ with IFCVF_SANITIZE=1 into a temporary directory (the in-tree
ifcvf/_native*.so is not touched), then runs pytest on the relay tests in a
child process that preloads the ASan and UBSan runtimes (CPython itself is not
instrumented, so ASan must be loaded first) and imports the sanitized module
as ``ifcvf._native`` before any test module does.  PYTHONMALLOC=malloc puts
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
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_TESTS = ["tests/property/test_relay_diff.py", "tests/unit/test_relay.py",
                 "tests/unit/test_relay_notify.py"]
REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer"
                    r"|ERROR: LeakSanitizer")

BOOTSTRAP = r"""
import importlib.util, os, sys
path = os.environ["IFCVF_NATIVE_SO"]
spec = importlib.util.spec_from_file_location("ifcvf._native", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
import ifcvf
sys.modules["ifcvf._native"] = module
ifcvf._native = module
import pytest
code = pytest.main(sys.argv[1:])
import ifcvf._native as check
assert check.__file__ == path, (check.__file__, path)
sys.exit(code)
"""


def runtime(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"{name} not found (gcc -print-file-name gave {path!r})")
    return os.path.realpath(path)


def build(outdir: pathlib.Path) -> pathlib.Path:
    """Compile the sanitized extension into outdir; return the .so path."""
    # cffi compiles from inside its tmpdir and the build script names sources
    # relative to the project root, so give the tmpdir a csrc/ of its own.
    link = outdir / "csrc"
    if not link.exists():
        link.symlink_to(ROOT / "csrc")
    env = dict(os.environ, IFCVF_SANITIZE="1")
    code = ("import runpy, sys; ns = runpy.run_path(sys.argv[1]); "
            "print(ns['ffibuilder'].compile(tmpdir=sys.argv[2], verbose=False))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "csrc" / "build_native.py"),
                           str(outdir)], cwd=outdir, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"sanitized build failed:\n{done.stdout}\n{done.stderr}")
    return pathlib.Path(done.stdout.strip().splitlines()[-1])


def sanitizer_env(so: pathlib.Path) -> dict:
    return dict(
        os.environ,
        IFCVF_NATIVE_SO=str(so),
        LD_PRELOAD=":".join([runtime("libasan.so"), runtime("libubsan.so")]),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:strict_string_checks=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        PYTHONMALLOC="malloc",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        HYPOTHESIS_PROFILE=os.environ.get("HYPOTHESIS_PROFILE", "ci"),
    )


def run(so: pathlib.Path, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """pytest (args) in a child with the sanitizers loaded and ``so`` as ifcvf._native.

    --capture=sys: pytest's default fd capture would swallow a sanitizer report,
    which the runtime writes to fd 2 just before it ends the process."""
    return subprocess.run([sys.executable, "-c", BOOTSTRAP, "--capture=sys", *args], cwd=ROOT,
                          env=sanitizer_env(so), capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", metavar="DIR", help="build into DIR and keep it")
    parser.add_argument("tests", nargs="*", default=DEFAULT_TESTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ifcvf-san-") as tmp:
        outdir = pathlib.Path(args.keep or tmp)
        outdir.mkdir(parents=True, exist_ok=True)
        so = build(outdir)
        done = run(so, ["-q", "-p", "no:cacheprovider", *args.tests])
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        if REPORT.search(done.stdout + done.stderr):
            print("sanitizer report found", file=sys.stderr)
            return 1
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
