"""What the two cffi build scripts share (csrc/driver/build_native.py for
ifcvf._native, csrc/sim/build_native.py for sim._native).

A module is built from the C files of its own directory only, with csrc/common/
on the include path.  Its cdef is csrc/common/ifc_common.h followed by the
module's header, each stripped of preprocessor lines other than plain integer
#defines: the same files are the C headers and the cffi declarations.
IFCVF_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
(load it with libasan preloaded; see tests/sanitize/relay_sanitized.py).
"""
import os
import pathlib
import re

from cffi import FFI

CSRC = pathlib.Path(__file__).resolve().parent.parent
COMMON = CSRC / "common"
ROOT = CSRC.parent


def cdef_text(header: str) -> str:
    keep = []
    for line in header.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not re.match(r"#define\s+\w+\s+-?\w+", stripped):
            continue
        keep.append(re.sub(r"(#define\s+\w+\s+-?\w+).*", r"\1", line))
    return "\n".join(keep)


def build_flags():
    flags = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]
    link = []
    if os.environ.get("IFCVF_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        flags = [f for f in flags if f != "-O2"] + ["-O1"] + san
        link += san
    return flags, link


def builder(module: str, directory: pathlib.Path, header: str) -> FFI:
    """An FFI for ``module`` from directory/*.c, declared by directory/header.

    Source and include paths are relative to the project root, the directory
    setuptools (and the sanitizer build, through a csrc/ link) compiles from."""
    ffi = FFI()
    ffi.cdef(cdef_text((COMMON / "ifc_common.h").read_text()) + "\n"
             + cdef_text((directory / header).read_text()))
    cflags, ldflags = build_flags()
    ffi.set_source(
        module,
        f'#include <stdint.h>\n#include "{header}"',
        sources=[str(p.relative_to(ROOT)) for p in sorted(directory.glob("*.c"))],
        include_dirs=[str(directory.relative_to(ROOT)), str(COMMON.relative_to(ROOT))],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return ffi
