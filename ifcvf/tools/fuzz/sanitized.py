"""AddressSanitizer + UBSan builds of both native modules, and a process that runs them.

``build`` compiles ifcvf._native (csrc/driver/) and sim._native (csrc/sim/)
with IFCVF_SANITIZE=1 into a directory of the caller's (the in-tree
extensions are not touched).  ``environment`` is what a child process needs to
run them: the sanitizer runtimes preloaded (CPython itself is not
instrumented, so gcc's libasan must be loaded first), PYTHONMALLOC=malloc so
every Python buffer (guest memory, logs, rings) sits on the instrumented
malloc with redzones around it, and the paths ``install`` reads to import the
sanitized modules as ``ifcvf._native`` and ``sim._native`` before anything
else imports them.

Used by the ``relay-asan`` fuzz target (engine.py) and by
tests/sanitize/relay_sanitized.py.  Needs the source tree's csrc/ and gcc.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
ENV_MODULES = "IFCVF_SANITIZED_MODULES"
#: The native modules, by name, and the csrc/ directory of each.
MODULES = {"ifcvf._native": "driver", "sim._native": "sim"}
#: What either sanitizer prints when it finds something.
REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer"
                    r"|ERROR: LeakSanitizer")


class SanitizerUnavailable(RuntimeError):
    """No gcc, no sanitizer runtime, or no csrc/ here: the sanitized build cannot exist."""


def runtime(name: str) -> str:
    """The real path of gcc's runtime library ``name`` (libasan.so, libubsan.so)."""
    if shutil.which("gcc") is None:
        raise SanitizerUnavailable("gcc is not installed")
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SanitizerUnavailable(f"{name} not found (gcc -print-file-name gave {path!r}; "
                                   "install libasan/libubsan for gcc)")
    return os.path.realpath(path)


def check_available() -> None:
    """SanitizerUnavailable, saying what is missing, unless ``build`` and
    ``environment`` can work here."""
    if not (ROOT / "csrc").is_dir():
        raise SanitizerUnavailable(f"the sanitized build needs the source tree's csrc/ ({ROOT})")
    runtime("libasan.so")
    runtime("libubsan.so")


def build(outdir: Path) -> dict[str, Path]:
    """Compile both sanitized extensions into ``outdir``; {module name: .so path}."""
    check_available()
    # cffi compiles from inside its tmpdir and the build scripts name sources
    # relative to the project root, so give the tmpdir a copy of csrc/ (a copy,
    # not a link: the objects are written next to the sources).
    outdir = Path(outdir)
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
            raise RuntimeError(f"sanitized build of {name} failed:\n{done.stdout}\n{done.stderr}")
        built[name] = Path(done.stdout.strip().splitlines()[-1])
    return built


def environment(sos: dict[str, Path], *, abort: bool = False) -> dict[str, str]:
    """The variables a child process needs to run the sanitized modules ``sos``.

    ``abort``: a report ends the process with SIGABRT (the fuzzing engine's
    children, where libFuzzer counts it as a crash and keeps the input);
    otherwise it exits with an error status after the report.  detect_leaks=0:
    CPython leaks by design at exit."""
    return {
        ENV_MODULES: json.dumps({name: str(path) for name, path in sos.items()}),
        "LD_PRELOAD": ":".join([runtime("libasan.so"), runtime("libubsan.so")]),
        "ASAN_OPTIONS": f"detect_leaks=0:abort_on_error={int(abort)}:halt_on_error=1:strict_string_checks=1",
        "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:abort_on_error={int(abort)}",
        "PYTHONMALLOC": "malloc",
    }


def install() -> dict[str, str]:
    """In a child started with ``environment``: import the sanitized modules under
    their real names, before any other module imports the uninstrumented ones.
    Returns {name: path} ({} when the child was not started for them)."""
    paths = json.loads(os.environ.get(ENV_MODULES, "{}"))
    for name, path in paths.items():
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    for name in paths:
        package, _, attr = name.rpartition(".")
        setattr(importlib.import_module(package), attr, sys.modules[name])
    return paths


def check_installed(paths: dict[str, str]) -> None:
    """Every module ``install`` put in place is the one code imports (not the in-tree build)."""
    for name, path in paths.items():
        module = importlib.import_module(name)
        if module.__file__ != path:
            raise RuntimeError(f"{name} is {module.__file__}, not the sanitized {path}")
