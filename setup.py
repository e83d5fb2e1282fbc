"""cffi build hook only: setuptools has no pyproject key for cffi_modules.

All package metadata lives in pyproject.toml.
"""
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
