"""The initramfs pieces, without booting: module order, the cpio writer, static-ELF detection."""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest

from guest_image import (INIT_SCRIPT, Cpio, GuestImageError, GuestKernel, build_initramfs, is_static_elf,
                         module_load_order)


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev): an independent reader of the newc format."""
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = f[1], f[6], (f[9], f[10]), f[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos = (pos + namesize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, rdev)


def write_modules(root: Path, dep_lines: list[str]) -> Path:
    root.mkdir(parents=True)
    (root / "modules.dep").write_text("\n".join(dep_lines) + "\n")
    for line in dep_lines:
        path = root / line.split(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF module " + path.name.encode())
    return root


DEPS = [
    "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko",
    "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko "
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko "
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko:",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko:",
    "kernel/drivers/virtio/virtio.ko:",
    "kernel/drivers/virtio/virtio_ring.ko:",
    "kernel/net/9p/9pnet.ko:",
    "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko "
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko",
    "kernel/fs/netfs/netfs.ko:",
]


def test_modules_come_after_their_dependencies_once_each(tmp_path):
    order = module_load_order(write_modules(tmp_path / "m", DEPS))
    names = [Path(p).stem for p in order]
    assert len(names) == len(set(names)) == 10
    deps = {Path(l.split(":")[0]).stem: [Path(d).stem for d in l.split(":")[1].split()] for l in DEPS}
    for i, name in enumerate(names):
        assert set(deps[name]) <= set(names[:i]), f"{name} loaded before {deps[name]}"
    assert names[-1] == "9p"


def test_missing_module_and_loops_are_errors(tmp_path):
    with pytest.raises(GuestImageError, match="no module 9p"):
        module_load_order(write_modules(tmp_path / "a", DEPS[1:]))
    loop = ["kernel/a.ko: kernel/b.ko", "kernel/b.ko: kernel/a.ko"]
    with pytest.raises(GuestImageError, match="loop"):
        module_load_order(write_modules(tmp_path / "b", loop), ("a",))


def test_cpio_entries_read_back():
    cpio = Cpio()
    cpio.directory("bin")
    cpio.file("bin/x", b"12345", 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.char_device("dev/console", 5, 1)
    entries = read_newc(cpio.finish())
    assert entries["bin"][0] == 0o040755
    assert entries["bin/x"][:2] == (0o100755, b"12345")
    assert entries["bin/sh"][:2] == (0o120777, b"busybox")
    assert entries["dev/console"][0] == 0o020600 and entries["dev/console"][2] == (5, 1)


def test_build_initramfs_contents_and_cache(tmp_path):
    modules = write_modules(tmp_path / "lib/modules/9.9", DEPS)
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF static busybox")
    kernel = GuestKernel(tmp_path / "vmlinuz", "9.9", modules)
    out = build_initramfs(kernel, busybox, tmp_path)
    entries = read_newc(gzip.decompress(out.read_bytes()))
    assert entries["init"][1].decode() == INIT_SCRIPT and entries["init"][0] & 0o111
    assert entries["dev/console"][2] == (5, 1)
    order = entries["modules.order"][1].decode().split()
    assert order[-1] == "9p.ko" and all(f"modules/{m}" in entries for m in order)
    assert build_initramfs(kernel, busybox, tmp_path) == out     # same inputs: the cached file


def test_static_elf_detection(tmp_path):
    assert not is_static_elf(Path(sys.executable).resolve())       # CPython links libc dynamically
    not_elf = tmp_path / "script"
    not_elf.write_text("#!/bin/sh\n")
    assert not is_static_elf(not_elf)
