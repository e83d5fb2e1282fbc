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
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_TESTS = ["tests/property/test_relay_diff.py", "tests/unit/test_relay.py",
                 "tests/unit/test_relay_notify.py"]
REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer"
                    r"|ERROR: LeakSanitizer")

# The native modules, by name, and the build script of each (csrc/<dir>/build_native.py).
MODULES = {"ifcvf._native": "driver", "sim._native": "sim"}

BOOTSTRAP = r"""
import importlib, importlib.util, json, os, sys
paths = json.loads(os.environ["IFCVF_SANITIZED_MODULES"])
for name, path in paths.items():
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
for name in paths:
    package, _, attr = name.rpartition(".")
    setattr(importlib.import_module(package), attr, sys.modules[name])
import pytest
code = pytest.main(sys.argv[1:])
for name, path in paths.items():
    check = importlib.import_module(name)
    assert check.__file__ == path, (name, check.__file__, path)
sys.exit(code)
"""


def runtime(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"{name} not found (gcc -print-file-name gave {path!r})")
    return os.path.realpath(path)


def build(outdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Compile both sanitized extensions into outdir; return {module name: .so path}."""
    # cffi compiles from inside its tmpdir and the build scripts name sources
    # relative to the project root, so give the tmpdir a copy of csrc/ (a copy,
    # not a link: the objects are written next to the sources).
    src = outdir / "csrc"
    if src.is_symlink():
        src.unlink()
    shutil.copytree(ROOT / "csrc", src, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.o", "__pycache__"))
    env = dict(os.environ, IFCVF_SANITIZE="1")
    code = ("import runpy, sys; ns = runpy.run_path(sys.argv[1]); "
            "print(ns['ffibuilder'].compile(tmpdir=sys.argv[2], verbose=False))")
    built = {}
    for name, directory in MODULES.items():
        done = subprocess.run([sys.executable, "-c", code, str(src / directory / "build_native.py"),
                               str(outdir)], cwd=outdir, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"sanitized build of {name} failed:\n{done.stdout}\n{done.stderr}")
        built[name] = pathlib.Path(done.stdout.strip().splitlines()[-1])
    return built


def sanitizer_env(sos: dict[str, pathlib.Path]) -> dict:
    return dict(
        os.environ,
        IFCVF_SANITIZED_MODULES=json.dumps({name: str(path) for name, path in sos.items()}),
        LD_PRELOAD=":".join([runtime("libasan.so"), runtime("libubsan.so")]),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:strict_string_checks=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        PYTHONMALLOC="malloc",
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
