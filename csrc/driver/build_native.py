"""cffi build script for ifcvf._native (out-of-line API mode, compiled at install).

The driver's C: dirty-log marking, the guest memory table, the used-ring relay
and the notify loop, from csrc/driver/*.c only (declared in ifcvf_native.h);
see csrc/common/cffi_build.py for what both modules share.
"""
import importlib.util
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ifc_cffi_build", HERE.parent / "common" / "cffi_build.py")
cffi_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cffi_build)

ffibuilder = cffi_build.builder("ifcvf._native", HERE, "ifcvf_native.h")

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
