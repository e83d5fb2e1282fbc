"""Fuzz target ``relay``: the C used-ring relay (csrc/driver/relay.c) on hostile
rings, against the Python oracle (tests/relay_oracle.py).

The property is tests/property/test_relay_diff.py's: guest memory with holes
and odd alignment, descriptor tables with loops, out-of-range ids, addresses
and lengths, chains longer than the ring, indirect tables, racing indices and
new logs between calls; C and the oracle must agree on every return value,
every error detail, guest memory, the mediated ring and the log bits.
"""
from ifcvf.tools.fuzz._tests import add_paths

add_paths()

from test_relay_diff import test_c_relay_matches_oracle as PROPERTY  # noqa: E402,F401
