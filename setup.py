"""cffi build hook only: setuptools has no pyproject key for cffi_modules.

All package metadata lives in pyproject.toml.  Two extensions: the driver's
ifcvf._native (csrc/driver/) and the simulator's sim._native (csrc/sim/).
"""
from setuptools import setup

setup(cffi_modules=["csrc/driver/build_native.py:ffibuilder", "csrc/sim/build_native.py:ffibuilder"])
