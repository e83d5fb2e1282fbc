"""`ifcvf serve --wire`: which VF a wire belongs to, its refusals, its help."""
import re
import socket
import subprocess
import sys

import pytest

from test_serve import TIMEOUT, Served


def serve(*args):
    return subprocess.run([sys.executable, "-m", "ifcvf", "serve", *args],
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_a_wire_belongs_to_the_device_before_it(tmp_path):
    remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    remote.bind(("127.0.0.1", 0))
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    served = Served("--socket", str(a), "--device", "sim",
                    "--socket", str(b), "--device", "sim",
                    "--wire", f"udp:0:{remote.getsockname()[1]}")
    try:
        line = served.wait_for("wire udp")
        served.wait_for(f"serving sim on {b}")
        m = re.search(r"wire udp 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:(\d+)", line)
        assert m and int(m.group(2)) == remote.getsockname()[1]
        assert "sim (vf1): wire" in line          # the second VF's, the --device before it
        # The local port is really held by the back-end.
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(OSError):
            probe.bind(("127.0.0.1", int(m.group(1))))
        probe.close()
        # Only one VF has a wire: the first was opened without one.
        assert not any("wire udp" in seen for seen in served.lines)
        assert served.stop() == 0
    finally:
        served.stop()
        remote.close()


@pytest.mark.parametrize("args, why", [
    (["--wire", "udp:1:2", "--socket", "/tmp/x", "--device", "sim"], "must follow the --device"),
    (["--socket", "/tmp/x", "--device", "sim", "--wire", "udp:1:2", "--wire", "udp:3:4"],
     "two --wire"),
    (["--socket", "/tmp/x", "--device", "sim", "--wire", "udp:1"], "udp:LOCAL_PORT:REMOTE_PORT"),
    (["--socket", "/tmp/x", "--device", "0000:3b:00.2", "--wire", "udp:1:2"], "real one"),
])
def test_wire_refusals_are_explained(args, why):
    proc = serve(*args)
    assert proc.returncode != 0
    assert why in proc.stderr


def test_help_documents_the_wire():
    proc = serve("--help")
    assert proc.returncode == 0
    assert "--wire udp:LOCAL_PORT:REMOTE_PORT" in proc.stdout
    assert "no FCS" in proc.stdout
