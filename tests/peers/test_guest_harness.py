"""The guest harness itself: status, output, tracebacks, the shared directory, the NIC's host end, timeouts.

Each test boots one guest (about 7-10 s under TCG).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from guest import GuestError, GuestNet, host_python

CHECK = Path(__file__).with_name("guest_harness_check.py")
FRAMES = 5

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def test_status_output_traceback_results_and_frames_into_the_guest(guest_env, tmp_path):
    net = GuestNet()
    try:
        with guest_env.start([host_python(), str(CHECK), str(tmp_path), str(FRAMES)],
                             results_dir=tmp_path, net=net) as guest:
            ready = guest.wait_for(r"^GUEST-READY (\S+)$", timeout=180)
            for i in range(FRAMES):
                net.send(b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x88\xb5" + f"frame {i}".encode()
                         + bytes(40))
            result = guest.wait(timeout=120)
    finally:
        net.close()
    assert ready.group(1)
    assert result.exit_status == 1, result.describe()
    assert f"GUEST-RECEIVED {FRAMES}" in result.output, result.describe()
    assert "Traceback (most recent call last)" in result.output
    assert "DeliberateFailure: the harness must show this traceback on the host" in result.output
    assert (tmp_path / "from-guest.txt").read_text().startswith("written in the guest, kernel 6.")
    assert result.results_dir == tmp_path.resolve()
    assert "IFCVF-GUEST-START" not in result.output and "IFCVF-GUEST-EXIT" not in result.output
    assert result.output in result.serial_log and result.serial_log.count("IFCVF-GUEST-") == 2
    assert 0 < result.boot_seconds < result.total_seconds
    assert guest.proc.poll() is not None


def test_a_guest_that_overruns_its_timeout_is_killed(guest_env, tmp_path):
    with guest_env.start(["sleep", "600"], results_dir=tmp_path) as guest:
        guest.wait_until_started(timeout=180)
        with pytest.raises(GuestError, match="nothing matched within 1.0 s") as err:
            guest.wait(timeout=1)
        assert guest.proc.poll() is not None, "QEMU still running after the timeout"
        assert guest.net is None, "the GuestNet made for the guest was not released"
    assert "last 60 console lines" in str(err.value)
