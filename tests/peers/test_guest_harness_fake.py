"""The guest harness against a fake QEMU: marker parsing, timeouts, early exits, the command line.

No QEMU, no kernel: a small script stands in for qemu-system-x86_64 and prints
what a guest would print on its serial console, in fragments, so the
harness's line handling and every way out are checked on any machine in
about a second.  The real boots are in test_guest_harness.py.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from guest import GuestConfig, GuestEnv, GuestError, GuestNet
from guest_image import GuestKernel

FAKE_QEMU = r'''
import os, signal, sys, time
args = sys.argv[1:]
token = args[args.index("-append") + 1].split("ifcvf_token=")[1].split()[0]
mode = os.environ["FAKE_QEMU_MODE"]

def emit(*parts):
    for part in parts:
        sys.stdout.buffer.write(part.encode())
        sys.stdout.buffer.flush()
        time.sleep(0.01)  # a fake device's pacing, so the host reads the markers in pieces

emit("SeaBIOS (fake)\r\n", "Booting from ROM...\r\n")
if mode == "initfail":
    emit(f"IFCVF-GUEST-INIT-FAILED {token}: cannot mount the host root\n", "\n", f"IFCVF-GUEST-EXIT {token} 125\n")
    sys.exit(0)
emit(f"IFCVF-GUEST-START {token}\n")
if mode == "ok":
    emit("hello\n", "wor", "ld\n", "\n", "IFCVF-GUEST-EX", f"IT {token}", " 7", "\n", "reboot: Power down\n")
elif mode == "hang":
    signal.pause()
elif mode == "die":
    sys.stderr.write("qemu-system-x86_64: the fake device model failed\n")
    sys.exit(1)
'''


@pytest.fixture
def fake_env(tmp_path) -> GuestEnv:
    qemu = tmp_path / "fake-qemu"
    qemu.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    qemu.chmod(0o755)
    kernel = GuestKernel(Path("/fake/vmlinuz"), "fake", Path("/fake/modules"))
    return GuestEnv(str(qemu), kernel, Path("/fake/initrd.cpio.gz"), tmp_path)


def test_status_and_output_come_from_between_the_markers(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_QEMU_MODE", "ok")
    result = fake_env.run(["python3", "-c", "print('hello')"], timeout=30, results_dir=tmp_path / "r")
    assert result.exit_status == 7
    assert result.output == "hello\nworld\n"
    assert "SeaBIOS (fake)\nBooting" in result.serial_log          # \r stripped
    assert result.results_dir == (tmp_path / "r").resolve() and result.results_dir.is_dir()
    assert 0 < result.boot_seconds <= result.total_seconds


def test_a_hung_guest_is_killed_at_the_timeout(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_QEMU_MODE", "hang")
    with fake_env.start(["true"], results_dir=tmp_path) as guest:
        guest.wait_until_started(timeout=30)
        with pytest.raises(GuestError, match="nothing matched within 0.2 s"):
            guest.wait(timeout=0.2)
        assert guest.proc.poll() is not None
        assert guest.net is None


def test_qemu_dying_early_is_an_error_with_its_stderr(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_QEMU_MODE", "die")
    with pytest.raises(GuestError, match="QEMU exited") as err:
        fake_env.run(["true"], timeout=30, results_dir=tmp_path)
    assert "the fake device model failed" in str(err.value)


def test_init_failure_is_reported_as_such(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_QEMU_MODE", "initfail")
    with pytest.raises(GuestError, match="guest init failed before the command ran: .*cannot mount the host root"):
        fake_env.run(["true"], timeout=30, results_dir=tmp_path)


def test_command_script_quotes_the_command_and_sets_the_environment(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_QEMU_MODE", "ok")
    with fake_env.start(["python3", "-c", "print('a b')"], results_dir=tmp_path, env={"X": "it's"},
                        cwd="/work dir") as guest:
        guest.wait(timeout=30)
    script = (guest.run_dir / "ctl/cmd.sh").read_text()
    assert "exec python3 -c 'print('\"'\"'a b'\"'\"')' </dev/null 2>&1" in script
    assert "export X='it'\"'\"'s'" in script and "cd '/work dir' || exit 126" in script
    assert "export PYTHONDONTWRITEBYTECODE=1" in script
    assert (guest.run_dir / "ctl/results_path").read_text() == f"{tmp_path.resolve()}\n"


def test_qemu_command_line(fake_env, tmp_path):
    net = GuestNet()
    try:
        args = fake_env.qemu_command("abc123", tmp_path / "ctl", tmp_path / "res", GuestConfig(), net)
    finally:
        net.close()
    line = shlex.join(args)
    assert "-machine q35,accel=tcg" in line
    append = args[args.index("-append") + 1].split()
    assert {"intel_iommu=on", "iommu=pt", "console=ttyS0", "panic=-1", "ifcvf_token=abc123"} <= set(append)
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert devices[0] == "intel-iommu,intremap=on,caching-mode=on"      # before every PCI device
    nic = [d for d in devices if d.startswith("virtio-net-pci")]
    assert nic and "disable-legacy=on" in nic[0] and "iommu_platform=on" in nic[0]
    assert f"socket,id=n0,udp=127.0.0.1:{net.host_port},localaddr=127.0.0.1:{net.guest_port}" in args
    fsdevs = [args[i + 1] for i, a in enumerate(args) if a == "-fsdev"]
    assert any("path=/," in f and "readonly=on" in f for f in fsdevs)
    assert any(f"path={tmp_path / 'res'}," in f and "readonly" not in f for f in fsdevs)
    assert "-no-reboot" in args and "-nodefaults" in args
    assert not any("kvm" in a for a in args)


def test_iommu_options_extend_the_viommu(fake_env, tmp_path):
    net = GuestNet()
    try:
        args = fake_env.qemu_command("abc123", tmp_path / "ctl", tmp_path / "res",
                                     GuestConfig(iommu_options="aw-bits=48"), net)
    finally:
        net.close()
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert devices[0] == "intel-iommu,intremap=on,caching-mode=on,aw-bits=48"
