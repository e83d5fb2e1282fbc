"""cffi build script for ifcvf._native (out-of-line API mode, compiled at install).

Every csrc/*.c is compiled into one extension; csrc/ifcvf_native.h is both the
C header and, stripped of preprocessor lines other than integer #defines, the
cffi cdef.  IFCVF_SANITIZE=1 builds with AddressSanitizer and
UndefinedBehaviorSanitizer (load it with libasan preloaded; see tests/README).
"""
import os
import pathlib
import re

from cffi import FFI

CSRC = pathlib.Path(__file__).resolve().parent
HEADER = CSRC / "ifcvf_native.h"


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


ffibuilder = FFI()
ffibuilder.cdef(cdef_text(HEADER.read_text()))
_cflags, _ldflags = build_flags()
ffibuilder.set_source(
    "ifcvf._native",
    '#include <stdint.h>\n#include "ifcvf_native.h"',
    sources=[str(p.relative_to(CSRC.parent)) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=[str(CSRC.relative_to(CSRC.parent))],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
