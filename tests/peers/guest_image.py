"""The test guest's boot pieces: the kernel to boot and a tiny initramfs built at test time.

The initramfs holds a static busybox, the modules needed to reach the host
over virtio-9p (taken from the guest kernel's own module tree and loaded in
dependency order, since busybox insmod resolves nothing), and an init script.
The guest's real userland is the host's root, shared read-only over 9p, so
the guest runs this project's .venv Python with no image to maintain.

The cpio archive is written here directly (newc format): no cpio tool, no
root needed for the /dev/console node.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# What the init needs before it can mount the host root: the virtio PCI
# transport and the 9p filesystem over virtio.  Their dependencies
# (virtio_ring, virtio, netfs, fscache, ...) come from modules.dep.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p")

START_MARKER = "IFCVF-GUEST-START"
EXIT_MARKER = "IFCVF-GUEST-EXIT"
INIT_FAILED = "IFCVF-GUEST-INIT-FAILED"
# Only with ifcvf_hold=1 on the kernel command line (see hold() below).
HELD_MARKER = "IFCVF-GUEST-HELD"
HOLD_FAILED = "IFCVF-GUEST-HOLD-FAILED"

# PID 1.  Everything it prints goes to the serial console, which the host
# reads; the token (from the kernel command line) makes the markers unique
# to one boot, so stale text can never be taken for this run's result.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
token=$(sed -n 's/.*ifcvf_token=\([0-9a-f]*\).*/\1/p' /proc/cmdline)
finish() {
    echo
    echo "@EXIT@ $token $1"
    sync
    poweroff -f
}
fail() {
    echo "@INIT_FAILED@ $token: $*"
    finish 125
}
# ifcvf_hold=1: after the command, unmount every 9p share and keep the guest
# running on its kernel alone (QEMU refuses to migrate while a VirtFS share is
# mounted; the kernel still answers pings).  Children before parents.
# A command may leave /run/ifcvf/after-hold.sh (the control share): it is
# copied into the initramfs first and run by its busybox once the shares are
# gone, in the background, after the HELD marker.
hold() {
    echo
    echo "@EXIT@ $token $1"
    rm -f /after-hold.sh
    [ -f /ctl/after-hold.sh ] && cp /ctl/after-hold.sh /after-hold.sh
    for m in $(awk -v r="$R" '$2 == r || index($2, r "/") == 1 || $2 == "/ctl" {print $2}' /proc/mounts | sort -r); do
        umount "$m"
    done
    if grep -q ' 9p ' /proc/mounts; then
        echo "@HOLD_FAILED@ $token: still mounted: $(grep ' 9p ' /proc/mounts | awk '{print $2}')"
    else
        echo "@HELD@ $token"
        [ -f /after-hold.sh ] && sh /after-hold.sh </dev/null &
    fi
    while :; do sleep 3600; done
}
while read -r mod; do
    insmod "/modules/$mod" || fail "insmod $mod failed"
done < /modules.order
R=/newroot
P9=trans=virtio,version=9p2000.L,msize=512000
# The host root, read-only; loose caching is safe for a tree nobody writes
# during the run and makes Python imports over 9p several times faster.
mount -t 9p -o "$P9,ro,cache=loose" hostroot $R || fail "cannot mount the host root (9p tag hostroot)"
mount -t 9p -o "$P9,cache=none" ifcvfctl /ctl || fail "cannot mount the control share (9p tag ifcvfctl)"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/shm $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/tmp
mount -t tmpfs tmpfs $R/run
mkdir -p $R/run/ifcvf
mount --bind /ctl $R/run/ifcvf
project=$(cat /ctl/project_path 2>/dev/null)
if [ -n "$project" ]; then
    mkdir -p "$R$project" 2>/dev/null
    mount -t 9p -o "$P9,ro,cache=loose" project "$R$project" || fail "cannot mount the project share at $project"
fi
results=$(cat /ctl/results_path)
if [ -n "$results" ]; then
    mkdir -p "$R$results"
    mount -t 9p -o "$P9,cache=none" results "$R$results" || fail "cannot mount the results share at $results"
fi
echo "@START@ $token"
chroot $R /bin/sh /run/ifcvf/cmd.sh
status=$?
grep -q ifcvf_hold=1 /proc/cmdline && hold $status
finish $status
""".replace("@EXIT@", EXIT_MARKER).replace("@START@", START_MARKER).replace("@INIT_FAILED@", INIT_FAILED) \
   .replace("@HELD@", HELD_MARKER).replace("@HOLD_FAILED@", HOLD_FAILED)


class GuestImageError(Exception):
    """A boot piece is missing or unusable; the message says which and how to get it."""


@dataclass(frozen=True)
class GuestKernel:
    image: Path
    version: str
    modules: Path  # /lib/modules/<version>


def find_guest_kernel() -> GuestKernel | None:
    """The kernel to boot: $IFCVF_GUEST_KERNEL, else the newest usable /boot/vmlinuz-*.

    Usable means readable, with a module tree holding the 9p/virtio modules in
    a form busybox insmod can load.  Debian's -amd64 kernels are preferred:
    they are what these tests were written against (a CI runner's own cloud
    kernel may sit in /boot too, with zstd modules).
    """
    override = os.environ.get("IFCVF_GUEST_KERNEL")
    if override:
        candidates = [Path(override)]
    else:
        candidates = sorted(Path("/boot").glob("vmlinuz-*"),
                            key=lambda p: (p.name.endswith("-amd64"), _version_key(p.name)), reverse=True)
    rejected.clear()
    for image in candidates:
        version = image.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        if not image.is_file() or not os.access(image, os.R_OK):
            rejected.append(f"{image}: missing or not readable")
            continue
        if not (modules / "modules.dep").is_file():
            rejected.append(f"{image}: no {modules}/modules.dep")
            continue
        try:
            order = module_load_order(modules)
        except GuestImageError as e:
            rejected.append(f"{image}: {e}")
            continue
        if any(m.endswith(".zst") for m in order):
            rejected.append(f"{image}: zstd-compressed modules")
            continue
        return GuestKernel(image, version, modules)
    return None


# Why find_guest_kernel() passed over each candidate, for the skip message.
rejected: list[str] = []


def _version_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP segment (needs no dynamic loader)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        phoff = int.from_bytes(head[0x20:0x28], "little")
        phentsize = int.from_bytes(head[0x36:0x38], "little")
        phnum = int.from_bytes(head[0x38:0x3A], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    PT_INTERP = 3
    return all(int.from_bytes(table[i * phentsize:i * phentsize + 4], "little") != PT_INTERP
               for i in range(phnum))


def find_static_busybox(cache: Path) -> Path:
    """A statically linked busybox: the host's if it is static, else busybox-static's, downloaded."""
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).is_file() and is_static_elf(Path(candidate)):
            return Path(candidate)
    extracted = cache / "busybox-static" / "bin" / "busybox"
    if extracted.is_file():
        return extracted
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", "busybox-static"], cwd=debs, check=True,
                       capture_output=True, text=True, timeout=300)
        deb = next(debs.glob("busybox-static_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "busybox-static")], check=True,
                       capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError, StopIteration) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise GuestImageError(f"no static busybox: the host's busybox is dynamic (or missing) and "
                              f"`apt-get download busybox-static` failed ({detail.strip()}); "
                              f"install busybox-static") from None
    if not (extracted.is_file() and is_static_elf(extracted)):
        raise GuestImageError(f"busybox-static did not contain a static {extracted}")
    return extracted


def module_load_order(modules_dir: Path, wanted: tuple[str, ...] = INITRAMFS_MODULES) -> list[str]:
    """Module files (relative to modules_dir) with every dependency before its users."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
        by_name[_module_name(target)] = target
    order: list[str] = []

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if path in order:
            return
        if path in chain:
            raise GuestImageError(f"module dependency loop: {' -> '.join(chain + (path,))}")
        for dep in deps.get(path, []):
            visit(dep, chain + (path,))
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise GuestImageError(f"{modules_dir}: no module {name} (built in, or a different kernel?)")
        visit(by_name[key], ())
    return order


def _module_name(path: str) -> str:
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", os.path.basename(path)).replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        raise GuestImageError(f"{path}: zstd-compressed modules are not supported by this harness")
    return data


class Cpio:
    """A newc ("070701") archive, the format the kernel unpacks into its rootfs."""

    def __init__(self):
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.out.write(b"070701" + b"".join(b"%08x" % f for f in fields))
        self.out.write(name.encode() + b"\0")
        self._pad()
        self.out.write(data)
        self._pad()

    def _pad(self) -> None:
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def build_initramfs(kernel: GuestKernel, busybox: Path, out_dir: Path) -> Path:
    """Write the initramfs into out_dir (named by content, so a rebuild is a cache hit)."""
    modules = module_load_order(kernel.modules)
    blobs = {m: _module_bytes(kernel.modules / m) for m in modules}
    flat = [os.path.basename(m).removesuffix(".xz").removesuffix(".gz") for m in modules]
    digest = hashlib.sha256(INIT_SCRIPT.encode() + busybox.read_bytes()
                            + b"".join(blobs[m] for m in modules)).hexdigest()[:16]
    out = out_dir / f"ifcvf-guest-{kernel.version}-{digest}.cpio.gz"
    if out.is_file():
        return out
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "ctl", "modules"):
        cpio.directory(d)
    # The kernel opens /dev/console for init's stdio before anything is mounted.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    for path, name in zip(modules, flat):
        cpio.file(f"modules/{name}", blobs[path])
    cpio.file("modules.order", "".join(f"{n}\n" for n in flat).encode())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6))
    tmp.rename(out)
    return out
