"""Shared pytest set-up: hypothesis profiles, and the guest RAM fixture.

CI sets HYPOTHESIS_PROFILE=ci: derandomized (same examples every run), no
example database, no deadline (simulation steps vary in wall time).
"""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def ram():
    """16 MiB of guest RAM (a memfd), as a front-end's memory table hands it over."""
    from hal.memory import HostMemory

    mem = HostMemory(16 << 20, "guest")
    yield mem
    mem.close()
