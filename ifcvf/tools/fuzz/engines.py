"""Fuzz target ``engines``: the model's ring engines (csrc/sim, sim._native) on
random, mostly hostile descriptor tables and heads (tests/property/test_engine_props.py):
no access outside the mapping (canaries intact), no exception, and a broken
ring ends in DEVICE_NEEDS_RESET with the reason traced."""
from ifcvf.tools.fuzz._tests import add_paths

add_paths()

from test_engine_props import test_random_rings_never_escape_the_mapping as PROPERTY  # noqa: E402,F401
