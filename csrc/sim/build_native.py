"""cffi build script for sim._native (out-of-line API mode, compiled at install).

The simulator's C: the device's ring engines and PCIe/wire timing, the guest
driver's rings, test frames and their checker, and QEMU's fetch-and-clear of
the dirty log, from csrc/sim/*.c only (declared in sim_native.h); see
csrc/common/cffi_build.py for what both modules share.
"""
import importlib.util
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ifc_cffi_build", HERE.parent / "common" / "cffi_build.py")
cffi_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cffi_build)

ffibuilder = cffi_build.builder("sim._native", HERE, "sim_native.h")

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
