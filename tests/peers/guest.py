"""Run a command inside a QEMU (TCG) guest that has a VFIO-capable virtio-net NIC.

The guest: q35 with an emulated Intel IOMMU (interrupt remapping, caching mode,
which VFIO behind a vIOMMU needs), the Debian kernel booted with
intel_iommu=on, and QEMU's virtio-net-pci as a modern-only device behind the
IOMMU (iommu_platform=on), so it can be bound to vfio-pci in the guest and
driven by this project's VFIO backend.  Its netdev is a UDP socket pair on
loopback: whatever the guest NIC transmits arrives as one UDP datagram per
Ethernet frame at ``GuestNet.host``, and datagrams sent to ``GuestNet.guest_port``
are received by the NIC.

The host root is shared read-only over virtio-9p (the guest runs the host's
.venv Python), plus a writable results directory mounted at the same path as
on the host.  The init prints unique markers around the command on the serial
console; the host waits for them on QEMU's stdout (no polling), with an
overall timeout, and kills QEMU by PID on every way out.

    env = GuestEnv.prepare(cache_dir)          # once per session: finds QEMU, builds the initramfs
    result = env.run([host_python(), "script.py"], timeout=240, results_dir=tmp_path)
    result.exit_status, result.output, result.serial_log, result.results_dir

Traffic tests drive the guest while it runs:

    net = GuestNet()                            # host end of the NIC, yours to read and close
    with env.start(command, results_dir=tmp_path, net=net) as guest:
        guest.wait_for(r"^READY$", timeout=120)  # a line the guest command prints
        net.send(frame); reply = net.receive(timeout=5)
        result = guest.wait(timeout=120)

In pytest, the session fixture ``guest_env`` (conftest.py) gives the env.
Inside the guest the root is read-only: run pytest there with
``-p no:cacheprovider`` and write only to /tmp or the results directory.
"""
from __future__ import annotations

import ctypes
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import guest_image
from guest_image import (EXIT_MARKER, INIT_FAILED, START_MARKER, GuestImageError, GuestKernel,
                         build_initramfs, find_guest_kernel, find_static_busybox)

# This checkout, shared on its own: the guest mounts tmpfs over /tmp and /run,
# and a fresh clone (CI) may well live there.
PROJECT = Path(__file__).resolve().parents[2]

QEMU = "qemu-system-x86_64"
DEFAULT_TIMEOUT_S = 240.0
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What `-device virtio-net-pci` shows the guest: the IDs the peer tests expect.
NIC_VENDOR_DEVICE = (0x1AF4, 0x1041)
NIC_SUBSYSTEM = (0x1AF4, 0x1100)
NIC_MAC = "52:54:00:12:34:56"


class GuestError(Exception):
    """The guest did not run the command to completion; the message holds the console tail."""


def missing_prerequisites() -> str | None:
    """Why a guest cannot exist on this machine at all, or None.  (Busybox is fetched if needed.)"""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    if find_guest_kernel() is None:
        seen = "; ".join(guest_image.rejected) or "no /boot/vmlinuz-*"
        return (f"no usable guest kernel ({seen}): apt-get install linux-image-amd64, "
                f"or set IFCVF_GUEST_KERNEL")
    return None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GuestNet:
    """The host end of the guest NIC's UDP netdev: one datagram = one Ethernet frame (no vnet header).

    ``host`` is bound before QEMU starts (to a port the kernel picked, so it is
    ours); QEMU sends the NIC's transmissions there and listens on ``guest_port``.
    """

    def __init__(self):
        self.host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.host.bind(("127.0.0.1", 0))
        self.host_port = self.host.getsockname()[1]
        self.guest_port = free_udp_port()

    def qemu_args(self, nic_options: str = "") -> list[str]:
        nic = "virtio-net-pci,disable-legacy=on,iommu_platform=on,netdev=n0,mac=" + NIC_MAC
        return ["-netdev", f"socket,id=n0,udp=127.0.0.1:{self.host_port},localaddr=127.0.0.1:{self.guest_port}",
                "-device", nic + (f",{nic_options}" if nic_options else "")]

    def send(self, frame: bytes) -> None:
        """Deliver one Ethernet frame to the guest NIC's receive side."""
        self.host.sendto(frame, ("127.0.0.1", self.guest_port))

    def receive(self, timeout: float) -> bytes | None:
        """The next frame the guest NIC transmitted, or None after ``timeout`` seconds."""
        self.host.settimeout(timeout)
        try:
            return self.host.recv(65536)
        except socket.timeout:
            return None

    def close(self) -> None:
        self.host.close()


@dataclass
class GuestResult:
    exit_status: int
    output: str            # what the command printed (serial console, between the markers)
    serial_log: str        # everything the guest printed
    results_dir: Path      # the writable share, same path in the guest
    qemu_log: str          # QEMU's own stderr (device model warnings land here)
    boot_seconds: float    # QEMU start to the command starting
    total_seconds: float

    def describe(self) -> str:
        return (f"guest command exited {self.exit_status} after {self.total_seconds:.1f} s "
                f"(boot {self.boot_seconds:.1f} s)\n--- guest output ---\n{self.output}"
                + (f"\n--- QEMU stderr ---\n{self.qemu_log}" if self.qemu_log.strip() else ""))


@dataclass
class GuestConfig:
    memory_mib: int = 1024
    cpus: int = 1          # the test machines are small and shared; 1 vCPU boots as fast
    kernel_args: str = "quiet"
    nic: bool = True
    nic_options: str = ""
    # Appended to the vIOMMU's options.  QEMU's intel-iommu has 39 address bits by
    # default; the driver's IOVA windows for the dirty log and the mediated rings
    # (2**44, 2**45) need "aw-bits=48", the width of the VT-d units in servers.
    iommu_options: str = ""
    extra_qemu_args: list[str] = field(default_factory=list)


class RunningGuest:
    """One booted guest.  ``wait_for`` blocks on console text; ``close`` always kills QEMU."""

    def __init__(self, env: "GuestEnv", command: list[str], *, results_dir: Path, config: GuestConfig,
                 env_vars: dict[str, str] | None, cwd: str | None, net: GuestNet | None):
        self.token = secrets.token_hex(8)
        self.results_dir = Path(results_dir).resolve()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="ifcvf-guest-", dir=env.work_dir))
        self.serial_path = self.run_dir / "serial.log"
        self.qemu_log_path = self.run_dir / "qemu-stderr.log"
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._console = bytearray()
        self._changed = threading.Condition()
        self._eof = False
        self.started_at = time.monotonic()
        self.command_started_at: float | None = None
        self._start_line = f"{START_MARKER} {self.token}\n".encode()
        # A GuestNet passed in stays the caller's; one made here goes with the guest.
        self._own_net = net is None and config.nic
        self.net = net
        try:
            if self._own_net:
                self.net = GuestNet()
            ctl = self.run_dir / "ctl"
            ctl.mkdir()
            (ctl / "results_path").write_text(str(self.results_dir) + "\n")
            (ctl / "project_path").write_text(str(PROJECT) + "\n")
            (ctl / "cmd.sh").write_text(_command_script(command, env_vars or {}, cwd or os.getcwd()))
            args = env.qemu_command(self.token, ctl, self.results_dir, config, self.net)
            (self.run_dir / "qemu-command").write_text(shlex.join(args) + "\n")
            with open(self.qemu_log_path, "wb") as stderr:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=stderr, start_new_session=True,
                                             preexec_fn=_die_with_parent)
            self._reader = threading.Thread(target=self._read_console, name="guest-console", daemon=True)
            self._reader.start()
        except BaseException:
            self.close()
            raise

    def _read_console(self) -> None:
        assert self.proc and self.proc.stdout
        fd = self.proc.stdout.fileno()
        with open(self.serial_path, "wb") as log:
            while True:
                chunk = os.read(fd, 65536)
                if chunk:
                    log.write(chunk)
                    log.flush()
                with self._changed:
                    if chunk:
                        self._console += chunk.replace(b"\r", b"")
                        if self.command_started_at is None and self._start_line in self._console:
                            self.command_started_at = time.monotonic()
                    else:
                        self._eof = True
                    self._changed.notify_all()
                if not chunk:
                    return

    @property
    def console(self) -> str:
        with self._changed:
            return self._console.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Block until ``pattern`` (a regex, multiline) matches complete console lines.

        Only text up to the last newline is searched, so ``$`` never matches a
        line the guest is still printing.  GuestError on timeout or QEMU exit.
        """
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                complete = self._console[:self._console.rfind(b"\n") + 1]
                m = regex.search(complete.decode(errors="replace"))
                if m:
                    return m
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._changed.wait(remaining)
        why = "QEMU exited" if self._eof else f"nothing matched within {timeout:.1f} s"
        raise GuestError(f"waiting for {pattern!r} on the guest console: {why}\n{self.diagnostics()}")

    def wait(self, timeout: float = DEFAULT_TIMEOUT_S) -> GuestResult:
        """Wait for the command to finish and the guest to power off; always leaves QEMU dead."""
        deadline = time.monotonic() + timeout
        try:
            done = self.wait_for(rf"^(?:{EXIT_MARKER} {self.token} -?\d+|{INIT_FAILED} {self.token}: .*)$",
                                 max(deadline - time.monotonic(), 0))
            if done.group(0).startswith(INIT_FAILED):
                raise GuestError(f"guest init failed before the command ran: {done.group(0)}\n"
                                 f"{self.diagnostics()}")
            status = int(done.group(0).split()[-1])
            # The init powers off right after the marker: give QEMU a moment to go by itself.
            try:
                self.proc.wait(timeout=min(15.0, max(deadline - time.monotonic(), 1.0)))
            except subprocess.TimeoutExpired:
                pass
        finally:
            self.close()
        text = self.console
        start = re.search(rf"^{START_MARKER} {self.token}$\n?", text, re.M)
        end = re.search(rf"^{EXIT_MARKER} {self.token} ", text, re.M)
        output = text[start.end():end.start()] if start and end else ""
        if output.endswith("\n\n"):
            output = output[:-1]  # the newline init adds before its marker
        boot = (self.command_started_at or time.monotonic()) - self.started_at
        return GuestResult(status, output, text, self.results_dir, self.qemu_log(),
                           boot, time.monotonic() - self.started_at)

    def wait_until_started(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Block until the command has started in the guest (boot and mounts are done)."""
        self.wait_for(rf"^(?:{START_MARKER}|{INIT_FAILED}) {self.token}\b", timeout)

    def qemu_log(self) -> str:
        try:
            return self.qemu_log_path.read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self, lines: int = 60) -> str:
        tail = "\n".join(self.console.splitlines()[-lines:])
        out = f"--- last {lines} console lines ({self.serial_path}) ---\n{tail}"
        if self.qemu_log().strip():
            out += f"\n--- QEMU stderr ---\n{self.qemu_log()}"
        return out

    def close(self) -> None:
        """Kill QEMU (by its PID) if it is still running, reap it, release the net.  Idempotent."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if self._reader is not None:
                self._reader.join(timeout=10)
            if proc.stdout:
                proc.stdout.close()
        if self._own_net and self.net is not None:
            self.net.close()
            self.net = None

    def __enter__(self) -> "RunningGuest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL if the test process dies without reaching close()."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _command_script(command: list[str], env_vars: dict[str, str], cwd: str) -> str:
    env = {"PATH": GUEST_PATH, "HOME": "/tmp", "LANG": "C.UTF-8", "TERM": "dumb",
           # The root is read-only: no bytecode writes; unbuffered so output reaches the console live.
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    env.update(env_vars)
    lines = ["# written by tests/peers/guest.py; runs inside the guest's chroot of the host root"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f"cd {shlex.quote(cwd)} || exit 126")
    lines.append(f"exec {shlex.join(command)} </dev/null 2>&1")
    return "\n".join(lines) + "\n"


@dataclass
class GuestEnv:
    """What every guest run in a session shares: QEMU, the kernel, the initramfs, a work dir."""

    qemu: str
    kernel: GuestKernel
    initramfs: Path
    work_dir: Path

    @classmethod
    def prepare(cls, cache_dir: Path) -> "GuestEnv":
        reason = missing_prerequisites()
        if reason:
            raise GuestImageError(reason)
        kernel = find_guest_kernel()
        assert kernel is not None
        cache_dir.mkdir(parents=True, exist_ok=True)
        busybox = find_static_busybox(cache_dir)
        initramfs = build_initramfs(kernel, busybox, cache_dir)
        return cls(shutil.which(QEMU), kernel, initramfs, cache_dir)

    def qemu_command(self, token: str, ctl: Path, results: Path, config: GuestConfig,
                     net: GuestNet | None) -> list[str]:
        append = f"console=ttyS0 intel_iommu=on iommu=pt panic=-1 {config.kernel_args} ifcvf_token={token}"
        args = [self.qemu, "-machine", "q35,accel=tcg", "-cpu", "max",
                "-smp", str(config.cpus), "-m", str(config.memory_mib),
                "-nodefaults", "-display", "none", "-no-reboot",
                "-kernel", str(self.kernel.image), "-initrd", str(self.initramfs), "-append", append,
                "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
                # The vIOMMU first, so every PCI device after it sits behind it.
                "-device", "intel-iommu,intremap=on,caching-mode=on"
                + (f",{config.iommu_options}" if config.iommu_options else "")]
        shares = (("hostroot", Path("/"), True), ("ifcvfctl", ctl, False), ("results", results, False),
                  ("project", PROJECT, True))
        for tag, path, ro in shares:
            # A comma in an option value is written twice.
            args += ["-fsdev", f"local,id={tag},path={str(path).replace(',', ',,')},security_model=none,multidevs=remap"
                               + (",readonly=on" if ro else ""),
                     "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
        if config.nic:
            if net is None:
                raise ValueError("a guest NIC needs a GuestNet for its host side")
            args += net.qemu_args(config.nic_options)
        return args + list(config.extra_qemu_args)

    def start(self, command: list[str], *, results_dir: Path, config: GuestConfig | None = None,
              env: dict[str, str] | None = None, cwd: str | None = None,
              net: GuestNet | None = None) -> RunningGuest:
        """Boot a guest running ``command``; the caller must ``close()`` it (or use ``with``)."""
        return RunningGuest(self, command, results_dir=results_dir, config=config or GuestConfig(),
                            env_vars=env, cwd=cwd, net=net)

    def run(self, command: list[str], timeout: float = DEFAULT_TIMEOUT_S, *, results_dir: Path,
            config: GuestConfig | None = None, env: dict[str, str] | None = None,
            cwd: str | None = None, net: GuestNet | None = None) -> GuestResult:
        """Boot, run ``command`` to completion, power off.  GuestError if it does not finish in time."""
        with self.start(command, results_dir=results_dir, config=config, env=env, cwd=cwd, net=net) as guest:
            return guest.wait(timeout)


def host_python() -> str:
    """The interpreter the guest should run: this one (the project's .venv), visible over 9p."""
    return sys.executable
