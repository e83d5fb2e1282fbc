"""VfioFunction against a fake VFIO kernel: the ioctl sequence, bookkeeping and every way out.

The fake answers the ioctls the way vfio / vfio-pci / vfio_iommu_type1 do
(including the refusals this code has to work around, such as re-enabling
MSI-X with a different vector count), and gives a memfd as the device fd,
so config space and BAR accesses really go through pread/pwrite and mmap.
The real kernel and a real device are exercised by tests/peers.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from pathlib import Path

import pytest

from hal import vfio as vfio_mod
from hal import vfio_ioctl as V
from hal.api import HalError, HalTimeout, NotifyArea
from hal.memory import HostMemory
from hal.vfio import VfioError, VfioFunction

BDF = "0000:00:04.0"
GROUP = 4
SPAN = 1 << 16  # region i lives at i * SPAN in the device fd
REGIONS = {  # index: (flags, size)
    0: (V.VFIO_REGION_INFO_FLAG_READ | V.VFIO_REGION_INFO_FLAG_WRITE, 0x20),        # an I/O BAR
    1: (V.VFIO_REGION_INFO_FLAG_READ | V.VFIO_REGION_INFO_FLAG_WRITE, 0x1000),      # no mmap
    4: (V.VFIO_REGION_INFO_FLAG_READ | V.VFIO_REGION_INFO_FLAG_WRITE | V.VFIO_REGION_INFO_FLAG_MMAP, 0x4000),
    7: (V.VFIO_REGION_INFO_FLAG_READ | V.VFIO_REGION_INFO_FLAG_WRITE, 256),
}
ALL_FLAGS = 0xFF


def open_fds() -> set[str]:
    """Open fd numbers (including the one listdir itself uses, the same each time if nothing leaked)."""
    return set(os.listdir("/proc/self/fd"))


class FakeVfio:
    """Plays vfio's part for one function; ``calls`` records (request name, details)."""

    NAMES = {v: k for k, v in vars(V).items() if k.startswith("VFIO_") and isinstance(v, int)
             and 0x3B64 <= v <= 0x3B72}

    def __init__(self, *, api=0, type1v2=True, viable=True, msix=4, device_fd_error=None, regions=REGIONS):
        self.api, self.type1v2, self.viable, self.msix = api, type1v2, viable, msix
        self.device_fd_error = device_fd_error
        self.regions = regions
        self.calls: list[tuple[str, object]] = []
        self.msix_enabled = 0
        self.dma: dict[int, int] = {}
        self.dma_error: int | None = None
        self.device = os.memfd_create("fake-vfio-device")
        os.ftruncate(self.device, 8 * SPAN)
        config = bytearray(256)
        struct.pack_into("<HHH", config, 0, 0x1AF4, 0x1041, 0x0000)
        struct.pack_into("<HH", config, 0x2C, 0x8086, 0x001A)
        config[0x08] = 0x01
        config[0x09:0x0C] = bytes([0x00, 0x00, 0x02])
        struct.pack_into("<I", config, 0x10, 0xC001)          # BAR0: I/O space
        struct.pack_into("<I", config, 0x24 - 0x10 + 0x10, 0)  # BAR5 unused
        struct.pack_into("<I", config, 0x20, 0x0000000C)       # BAR4: 64-bit prefetchable memory
        os.pwrite(self.device, bytes(config), 7 * SPAN)

    def close(self) -> None:
        os.close(self.device)

    def ioctl(self, fd, request, arg=None):
        name = self.NAMES.get(request, hex(request))
        if name == "VFIO_GET_API_VERSION":
            self.calls.append((name, None))
            return self.api
        if name == "VFIO_CHECK_EXTENSION":
            self.calls.append((name, arg))
            return int(self.type1v2 and arg == V.VFIO_TYPE1v2_IOMMU)
        if name == "VFIO_GROUP_GET_STATUS":
            self.calls.append((name, None))
            arg.flags = V.VFIO_GROUP_FLAGS_VIABLE if self.viable else 0
            return 0
        if name == "VFIO_GROUP_SET_CONTAINER":
            self.calls.append((name, arg.value))
            return 0
        if name == "VFIO_SET_IOMMU":
            self.calls.append((name, arg))
            return 0
        if name == "VFIO_GROUP_GET_DEVICE_FD":
            self.calls.append((name, arg))
            if self.device_fd_error:
                raise OSError(self.device_fd_error, os.strerror(self.device_fd_error))
            return os.dup(self.device)
        if name == "VFIO_DEVICE_GET_INFO":
            self.calls.append((name, None))
            arg.flags, arg.num_regions, arg.num_irqs = V.VFIO_DEVICE_FLAGS_PCI, 9, 5
            return 0
        if name == "VFIO_DEVICE_GET_REGION_INFO":
            if arg.index not in self.regions:
                if arg.index >= 8:
                    raise OSError(errno.EINVAL, "no such region")
                arg.flags, arg.size, arg.offset = 0, 0, arg.index * SPAN
                return 0
            arg.flags, arg.size = self.regions[arg.index]
            arg.offset = arg.index * SPAN
            return 0
        if name == "VFIO_DEVICE_GET_IRQ_INFO":
            arg.count = {0: 1, 1: 1, 2: self.msix}[arg.index]
            return 0
        if name == "VFIO_DEVICE_SET_IRQS":
            raw = bytes(arg)
            argsz, flags, index, start, count = struct.unpack_from("<5I", raw)
            fds = list(struct.unpack_from(f"<{count}i", raw, 20)) if count else []
            assert argsz == len(raw) == 20 + 4 * count
            self.calls.append((name, (flags, index, start, fds)))
            if flags & V.VFIO_IRQ_SET_DATA_NONE and count == 0:
                self.msix_enabled = 0
            elif self.msix_enabled and start + count > self.msix_enabled:
                raise OSError(errno.EINVAL, "outside the enabled block")   # what vfio-pci does
            elif not self.msix_enabled:
                self.msix_enabled = count
            return 0
        if name == "VFIO_IOMMU_MAP_DMA":
            self.calls.append((name, (arg.flags, arg.vaddr, arg.iova, arg.size)))
            if self.dma_error:
                raise OSError(self.dma_error, os.strerror(self.dma_error))
            self.dma[arg.iova] = arg.size
            return 0
        if name == "VFIO_IOMMU_GET_INFO":
            # A 39-bit vIOMMU (QEMU's intel-iommu default): one IOVA range.
            raw = (ctypes.c_char * ctypes.sizeof(arg)).from_address(ctypes.addressof(arg))
            need = 24 + 16 + 16
            if struct.unpack_from("<I", raw)[0] < need:
                struct.pack_into("<IIQI", raw, 0, need, V.VFIO_IOMMU_INFO_PGSIZES | V.VFIO_IOMMU_INFO_CAPS,
                                 4096, 0)
                return 0
            struct.pack_into("<IIQI", raw, 0, need, V.VFIO_IOMMU_INFO_PGSIZES | V.VFIO_IOMMU_INFO_CAPS, 4096, 24)
            struct.pack_into("<HHIII", raw, 24, V.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0, 1, 0)
            struct.pack_into("<QQ", raw, 40, 0, (1 << 39) - 1)
            return 0
        if name == "VFIO_IOMMU_UNMAP_DMA":
            self.calls.append((name, (arg.iova, arg.size)))
            arg.size = self.dma.pop(arg.iova, 0)
            return 0
        raise AssertionError(f"unexpected ioctl {name}")

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


def make_sysfs(root: Path, *, driver="vfio-pci", other_member_driver=None) -> Path:
    devs = root / "bus/pci/devices"
    members = root / f"kernel/iommu_groups/{GROUP}/devices"
    members.mkdir(parents=True)
    for bdf, drv in ((BDF, driver), ("0000:00:04.1", other_member_driver)):
        if bdf != BDF and drv is None:
            continue
        d = root / "devices" / bdf
        d.mkdir(parents=True)
        for f, v in (("vendor", 0x1AF4), ("device", 0x1041), ("subsystem_vendor", 0x8086),
                     ("subsystem_device", 0x1A), ("class", 0x020000), ("revision", 1)):
            (d / f).write_text(f"{v:#x}\n")
        devs.mkdir(parents=True, exist_ok=True)
        os.symlink(d, devs / bdf)
        os.symlink(root / f"kernel/iommu_groups/{GROUP}", d / "iommu_group")
        os.symlink(d, members / bdf)
        (root / "bus/pci/drivers" / drv).mkdir(parents=True, exist_ok=True)
        os.symlink(root / "bus/pci/drivers" / drv, d / "driver")
    return root


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fake /sys and /dev/vfio, and the fake kernel behind ioctl."""
    vfio_dir = tmp_path / "dev-vfio"
    vfio_dir.mkdir()
    (vfio_dir / "vfio").touch()
    (vfio_dir / str(GROUP)).touch()
    fake = FakeVfio()
    monkeypatch.setattr(V, "ioctl", fake.ioctl)

    class Env:
        pass

    e = Env()
    e.fake, e.vfio_dir, e.tmp = fake, vfio_dir, tmp_path
    e.sysfs = make_sysfs(tmp_path / "sys")
    e.open = lambda: VfioFunction(BDF, sysfs_root=e.sysfs, vfio_dir=vfio_dir)
    yield e
    fake.close()


def test_open_follows_container_group_device_order(env):
    with env.open() as fn:
        names = env.fake.names()
        assert names[:7] == ["VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_GROUP_GET_STATUS",
                             "VFIO_GROUP_SET_CONTAINER", "VFIO_SET_IOMMU", "VFIO_GROUP_GET_DEVICE_FD",
                             "VFIO_DEVICE_GET_INFO"]
        calls = dict(env.fake.calls)
        assert calls["VFIO_CHECK_EXTENSION"] == V.VFIO_TYPE1v2_IOMMU
        assert calls["VFIO_SET_IOMMU"] == V.VFIO_TYPE1v2_IOMMU
        assert calls["VFIO_GROUP_SET_CONTAINER"] == fn.container_fd
        assert calls["VFIO_GROUP_GET_DEVICE_FD"] == BDF.encode() + b"\0"
        assert fn.group == GROUP


def test_ids_and_config_space_go_through_the_config_region(env):
    with env.open() as fn:
        ids = fn.ids
        assert (ids.vendor, ids.device, ids.subsystem_vendor, ids.subsystem_device) == (0x1AF4, 0x1041, 0x8086, 0x1A)
        assert ids.class_code == 0x020000 and ids.revision == 1
        # Opening turned on memory decoding and bus mastering.
        assert struct.unpack("<H", os.pread(env.fake.device, 2, 7 * SPAN + 4))[0] & 0x6 == 0x6
        fn.config_write(0x40, 4, 0x12345678)
        assert os.pread(env.fake.device, 4, 7 * SPAN + 0x40) == struct.pack("<I", 0x12345678)
        for offset, size in ((0x101, 1), (0xFE, 4), (0x41, 2), (0, 8)):
            with pytest.raises(HalError, match="config space access"):
                fn.config_read(offset, size)
        with pytest.raises(HalError, match="does not fit"):
            fn.config_write(0x40, 1, 0x100)


def test_bars_mmap_when_allowed_and_skip_io_bars(env):
    with env.open() as fn:
        assert fn.region(0) is None                       # I/O port BAR
        assert fn.region(2) is None                       # absent
        bar4, bar1 = fn.region(4), fn.region(1)
        assert bar4.size == 0x4000 and bar4.address_of(0x3000) is not None
        assert bar1.address_of(0) is None                 # no MMAP flag: pread/pwrite
        bar4.write16(0x16, 0xBEEF)
        bar4.write8(0x14, 0x0F)
        bar4.write64(0x20, 0x1122334455667788)
        assert os.pread(env.fake.device, 2, 4 * SPAN + 0x16) == b"\xef\xbe"
        assert os.pread(env.fake.device, 8, 4 * SPAN + 0x20) == struct.pack("<Q", 0x1122334455667788)
        os.pwrite(env.fake.device, struct.pack("<I", 0xCAFEF00D), 4 * SPAN + 0x100)
        assert bar4.read32(0x100) == 0xCAFEF00D and bar4.read8(0x14) == 0x0F
        bar1.write32(0x10, 0xA5A5A5A5)
        assert os.pread(env.fake.device, 4, 1 * SPAN + 0x10) == b"\xa5" * 4
        assert bar1.read16(0x12) == 0xA5A5
        with pytest.raises(HalError, match="outside the region"):
            bar4.read32(0x4000)
        with pytest.raises(HalError, match="outside the region"):
            bar4.address_of(0x4000)


def test_notify_area_is_the_page_of_the_doorbell_in_the_device_fd(env):
    with env.open() as fn:
        assert fn.notify_area(4, 0x3004) == NotifyArea(fd=fn.device_fd, offset=4 * SPAN + 0x3000, size=4096)
        assert fn.notify_area(1, 0) is None               # not mmap-able: nothing to hand out
        assert fn.notify_area(4, 0x4000) is None


def test_dma_map_passes_the_host_address_and_keeps_track(env):
    with env.open() as fn, HostMemory(4 * 4096) as mem:
        fn.dma_map(0x100000, mem, 4096, 2 * 4096)
        assert env.fake.calls[-1] == ("VFIO_IOMMU_MAP_DMA", (3, mem.address + 4096, 0x100000, 0x2000))
        assert fn.dma_mappings() == {0x100000: 0x2000}
        before = len(env.fake.calls)
        with pytest.raises(HalError, match="overlaps the existing mapping iova 0x100000\\+0x2000"):
            fn.dma_map(0x101000, mem, 0, 4096)
        with pytest.raises(HalError, match="iova 0x200010 is not 4096-byte page aligned"):
            fn.dma_map(0x200010, mem, 0, 4096)
        with pytest.raises(HalError, match="outside the"):
            fn.dma_map(0x300000, mem, 0, 5 * 4096)
        assert len(env.fake.calls) == before              # refused before reaching the kernel
        with pytest.raises(HalError, match="no such mapping"):
            fn.dma_unmap(0x100000, 0x1000)                # not exactly what was mapped
        fn.dma_unmap(0x100000, 0x2000)
        assert env.fake.calls[-1] == ("VFIO_IOMMU_UNMAP_DMA", (0x100000, 0x2000))
        assert fn.dma_mappings() == {}


@pytest.mark.parametrize("err, words", [(errno.ENOMEM, "locked-memory limit"), (errno.ENOSPC, "dma_entry_limit"),
                                        (errno.EINVAL, "reserved"), (errno.EEXIST, "already has a mapping")])
def test_dma_map_errors_say_why(env, err, words):
    with env.open() as fn, HostMemory(4096) as mem:
        env.fake.dma_error = err
        with pytest.raises(HalError, match=words) as e:
            fn.dma_map(0x100000, mem, 0, 4096)
        assert errno.errorcode[err] in str(e.value)
        assert fn.dma_mappings() == {}


def test_set_msix_enables_rebinds_resizes_and_disables(env):
    efds = [os.eventfd(0) for _ in range(3)]
    try:
        with env.open() as fn:
            assert fn.msix_vectors() == 4
            trigger = V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER
            disable = V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER
            irqs = lambda: [c for n, c in env.fake.calls if n == "VFIO_DEVICE_SET_IRQS"]  # noqa: E731
            fn.set_msix(efds[:2])
            assert irqs() == [(trigger, 2, 0, efds[:2])]
            fn.set_msix([efds[1], -1])                    # same count: rebind in place
            assert irqs()[-1] == (trigger, 2, 0, [efds[1], -1])
            fn.set_msix(efds)                             # more vectors: the kernel needs a disable first
            assert irqs()[-2:] == [(disable, 2, 0, []), (trigger, 2, 0, efds)]
            n = len(irqs())
            with pytest.raises(HalError, match="5 eventfds for 4 MSI-X vectors"):
                fn.set_msix(efds + efds[:2])
            assert len(irqs()) == n
            fn.set_msix([])
            assert irqs()[-1] == (disable, 2, 0, [])
            fn.set_msix([])                               # already off: nothing to do
            assert len(irqs()) == n + 1
    finally:
        for fd in efds:
            os.close(fd)


def test_close_releases_everything_and_is_idempotent(env):
    efd = os.eventfd(0)
    mem = HostMemory(4096)
    baseline = open_fds()
    try:
        fn = env.open()
        fn.dma_map(0x100000, mem, 0, 4096)
        fn.set_msix([efd])
        bar4 = fn.region(4)
        fn.close()
        assert env.fake.dma == {} and env.fake.msix_enabled == 0
        assert bar4.base is None and (fn.device_fd, fn.group_fd, fn.container_fd) == (-1, -1, -1)
        assert open_fds() == baseline
        calls = len(env.fake.calls)
        fn.close()
        assert len(env.fake.calls) == calls
    finally:
        os.close(efd)
        mem.close()


class BlockingPoller:
    def __init__(self, stops: bool = True):
        self.name = "test-poller"
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.stops = stops
        self.release = threading.Event()

    def fds(self):
        return []

    def step(self):
        return []

    def run(self):
        self.started.set()
        self.stopped.wait(10) if self.stops else self.release.wait(10)

    def stop(self):
        self.stopped.set()


def test_pollers_run_on_a_thread_and_stop(env, monkeypatch):
    with env.open() as fn:
        poller = BlockingPoller()
        fn.start_poller(poller)
        assert poller.started.wait(5)
        with pytest.raises(HalError, match="already running"):
            fn.start_poller(poller)
        fn.stop_poller(poller)
        assert poller.stopped.is_set()
        stuck = BlockingPoller(stops=False)
        fn.start_poller(stuck)
        assert stuck.started.wait(5)
        monkeypatch.setattr(vfio_mod, "POLLER_STOP_TIMEOUT_S", 0.05)
        with pytest.raises(HalTimeout, match="did not stop"):
            fn.stop_poller(stuck)
        stuck.release.set()


# --- every way the constructor can fail, and that it leaves nothing open ---------------
def expect_open_error(env, match: str) -> VfioError:
    baseline = open_fds()
    with pytest.raises(HalError, match=match) as err:
        env.open()
    assert open_fds() == baseline, "the failed open leaked file descriptors"
    return err.value


def test_function_not_bound_to_vfio_pci(env, tmp_path):
    env.sysfs = make_sysfs(tmp_path / "sys2", driver="virtio-pci")
    expect_open_error(env, "bound to virtio-pci, not vfio-pci: run `ifcvf bind 0000:00:04.0`")


def test_vfio_modules_not_loaded(env):
    (env.vfio_dir / "vfio").unlink()
    expect_open_error(env, "modprobe vfio-pci")


def test_group_node_missing(env):
    (env.vfio_dir / str(GROUP)).unlink()
    expect_open_error(env, "ifcvf bind")


def test_wrong_api_version(env):
    env.fake.api = 1
    expect_open_error(env, "API version 1")


def test_no_type1v2_iommu(env):
    env.fake.type1v2 = False
    expect_open_error(env, "modprobe vfio_iommu_type1")


def test_group_not_viable_names_the_other_members(env, tmp_path):
    env.sysfs = make_sysfs(tmp_path / "sys2", other_member_driver="e1000e")
    env.fake.viable = False
    err = expect_open_error(env, "not usable by VFIO")
    assert "0000:00:04.1" in str(err) and "e1000e" in str(err)
    assert "bind them" in str(err).lower() or "Bind them" in str(err)


def test_device_busy(env):
    env.fake.device_fd_error = errno.EBUSY
    expect_open_error(env, "already open")


def test_missing_config_region(env):
    env.fake.regions = {k: v for k, v in REGIONS.items() if k != 7}
    expect_open_error(env, "no usable config space")


def test_failure_after_the_bars_are_mapped_unmaps_them(env, monkeypatch):
    unmapped = []
    real_unmap = V.munmap
    monkeypatch.setattr(V, "munmap", lambda addr, size: (unmapped.append(size), real_unmap(addr, size)))
    # The last step of opening is the command-register write: make it fail.
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if offset == 7 * SPAN + 4:
            raise OSError(errno.EIO, "I/O error")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    expect_open_error(env, "config space: 2-byte write")
    assert unmapped == [0x4000]


def test_iova_ranges_come_from_the_iommu(env):
    with env.open() as fn:
        assert fn.iova_ranges() == [(0, (1 << 39) - 1)]


def test_parse_iova_ranges_handles_no_caps_and_chains():
    assert V.parse_iova_ranges(struct.pack("<IIQII", 24, V.VFIO_IOMMU_INFO_PGSIZES, 4096, 0, 0)) is None
    buf = bytearray(24 + 8 + 24 + 16 * 2)
    struct.pack_into("<IIQI", buf, 0, len(buf), V.VFIO_IOMMU_INFO_CAPS, 4096, 24)
    struct.pack_into("<HHI", buf, 24, 99, 1, 32)                       # some other capability first
    struct.pack_into("<HHIII", buf, 32, V.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0, 2, 0)
    struct.pack_into("<QQQQ", buf, 48, 0, 0xFEDFFFFF, 0xFEF00000, (1 << 48) - 1)
    assert V.parse_iova_ranges(bytes(buf)) == [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]
