"""Fixtures for tests that boot a QEMU guest (see guest.py).

``guest_env`` is built once per session (the initramfs is cached in a session
temp dir); it skips, saying why, only when QEMU or a guest kernel cannot exist
on this machine.  Anything else that goes wrong is a failure.
"""
from __future__ import annotations

import os
import sys

import pytest

from guest import GuestEnv, missing_prerequisites


@pytest.fixture(scope="session")
def guest_env(tmp_path_factory) -> GuestEnv:
    reason = missing_prerequisites()
    if reason:
        if os.environ.get("IFCVF_REQUIRE_PEERS") == "1":  # CI installs them: never skip there
            pytest.fail(f"guest tests cannot run: {reason}")
        print(f"skipping guest tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return GuestEnv.prepare(tmp_path_factory.mktemp("guest-image"))
