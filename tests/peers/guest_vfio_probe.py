"""Runs INSIDE the test guest: drive QEMU's virtio-net-pci through hal.sysfs and hal.vfio.

    python guest_vfio_probe.py RESULT_JSON TOKEN

Finds the NIC with the project's sysfs code, binds it to vfio-pci, opens it
with VfioFunction and exercises what the driver relies on: IDs through the
config region, the virtio capability walk, exact-width MMIO on BAR 4 (reset,
feature and queue registers), DMA mapping (including the refusals), MSI-X
routing, one transmitted frame (DMA through the vIOMMU, doorbell through
``address_of``, interrupt on an eventfd), then close and unbind.

Every observation goes into RESULT_JSON for the host-side test to assert on.
A failure prints its traceback (it reaches the host through the serial
console) and is recorded in the JSON as ``error``.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import select
import sys
import time
import traceback

from hal.api import HalError
from hal.memory import HostMemory
from hal.sysfs import Sysfs
from hal.vfio import VfioError, VfioFunction
from ifcvf import ids
from ifcvf.hw import walk_capabilities

IOVA = 0x10_0000
MEM_SIZE = 2 << 20
TX_QUEUE = 1
RING = {"desc": 0x0000, "avail": 0x1000, "used": 0x2000, "frame": 0x4000}
VNET_HDR_LEN = 12  # virtio_net_hdr with num_buffers: VERSION_1 always uses it
ETHERTYPE_LOCAL = 0x88B5


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def virtio_caps(fn) -> dict[int, dict]:
    """The first virtio vendor capability of each cfg_type, walked independently of ifcvf.hw."""
    found = {}
    pos = fn.config_read(0x34, 1) & 0xFC
    while pos:
        if fn.config_read(pos, 1) == ids.PCI_CAP_ID_VNDR:
            cfg_type = fn.config_read(pos + 3, 1)
            found.setdefault(cfg_type, {"pos": pos, "bar": fn.config_read(pos + 4, 1),
                                        "offset": fn.config_read(pos + 8, 4),
                                        "length": fn.config_read(pos + 12, 4),
                                        "extra": fn.config_read(pos + 16, 4) if cfg_type == ids.CAP_NOTIFY else None})
        pos = fn.config_read(pos + 1, 1) & 0xFC
    return found


def msix_enabled(fn) -> bool:
    pos = fn.config_read(0x34, 1) & 0xFC
    while pos:
        if fn.config_read(pos, 1) == ids.PCI_CAP_ID_MSIX:
            return bool(fn.config_read(pos + 2, 2) & 0x8000)
        pos = fn.config_read(pos + 1, 1) & 0xFC
    raise AssertionError("no MSI-X capability")


def reset(fn, bar, common) -> int:
    """Write status 0 and poll until the device reads back 0; returns polls needed (>= 1)."""
    bar.write8(common + ids.Common.DEVICE_STATUS, 0)
    reads = 0

    def is_reset() -> bool:
        nonlocal reads
        reads += 1
        return bar.read8(common + ids.Common.DEVICE_STATUS) == 0

    fn.clock.poll_until(is_reset, 1_000_000_000, interval_ns=100_000, what="device reset")
    return reads


def transmit_one(fn, bar, caps, mem, token: str, out: dict) -> None:
    """Bring up the TX queue of pair 0, send one frame, wait for used.idx and the interrupt."""
    common = caps[ids.CAP_COMMON]["offset"]
    c = lambda reg: common + reg  # noqa: E731
    view = mem.view
    bar.write8(c(ids.Common.DEVICE_STATUS), ids.Status.ACKNOWLEDGE | ids.Status.DRIVER)
    bar.write32(c(ids.Common.GUEST_FEATURE_SELECT), 0)
    bar.write32(c(ids.Common.GUEST_FEATURE), 0)
    bar.write32(c(ids.Common.GUEST_FEATURE_SELECT), 1)
    # VERSION_1 and ACCESS_PLATFORM: with iommu_platform=on QEMU refuses FEATURES_OK without it.
    bar.write32(c(ids.Common.GUEST_FEATURE), 0b11)
    bar.write8(c(ids.Common.DEVICE_STATUS), ids.Status.ACKNOWLEDGE | ids.Status.DRIVER | ids.Status.FEATURES_OK)
    out["features_ok"] = bool(bar.read8(c(ids.Common.DEVICE_STATUS)) & ids.Status.FEATURES_OK)

    bar.write16(c(ids.Common.QUEUE_SELECT), TX_QUEUE)
    size = bar.read16(c(ids.Common.QUEUE_SIZE))
    bar.write64(c(ids.Common.QUEUE_DESC), IOVA + RING["desc"])
    bar.write64(c(ids.Common.QUEUE_AVAIL), IOVA + RING["avail"])
    bar.write64(c(ids.Common.QUEUE_USED), IOVA + RING["used"])
    bar.write16(c(ids.Common.QUEUE_MSIX_VECTOR), 1)
    out["tx_queue_vector"] = bar.read16(c(ids.Common.QUEUE_MSIX_VECTOR))
    notify_off = bar.read16(c(ids.Common.QUEUE_NOTIFY_OFF))
    bar.write16(c(ids.Common.QUEUE_ENABLE), 1)
    bar.write8(c(ids.Common.DEVICE_STATUS), ids.Status.ACKNOWLEDGE | ids.Status.DRIVER
               | ids.Status.FEATURES_OK | ids.Status.DRIVER_OK)
    out["status_after_driver_ok"] = bar.read8(c(ids.Common.DEVICE_STATUS))

    payload = f"ifcvf-guest-vfio-probe {token}".encode()
    frame = b"\xff" * 6 + bytes.fromhex("525400123456") + ETHERTYPE_LOCAL.to_bytes(2, "big") + payload
    buf = RING["frame"]
    view[buf:buf + VNET_HDR_LEN] = bytes(VNET_HDR_LEN)
    view[buf + VNET_HDR_LEN:buf + VNET_HDR_LEN + len(frame)] = frame
    desc = RING["desc"]
    view[desc:desc + 16] = ((IOVA + buf).to_bytes(8, "little") + (VNET_HDR_LEN + len(frame)).to_bytes(4, "little")
                            + (0).to_bytes(2, "little") + (0).to_bytes(2, "little"))
    avail = RING["avail"]
    view[avail + 4:avail + 6] = (0).to_bytes(2, "little")   # ring[0] = descriptor 0
    view[avail + 2:avail + 4] = (1).to_bytes(2, "little")   # idx = 1, after the entry

    # The doorbell through the raw BAR pointer, the way the C relay rings it.
    doorbell = caps[ids.CAP_NOTIFY]["offset"] + notify_off * caps[ids.CAP_NOTIFY]["extra"]
    address = bar.address_of(doorbell)
    started = time.monotonic()
    ctypes.c_uint16.from_address(address).value = TX_QUEUE
    used_idx = lambda: int.from_bytes(view[RING["used"] + 2:RING["used"] + 4], "little")  # noqa: E731
    fn.clock.poll_until(lambda: used_idx() == 1, 5_000_000_000, interval_ns=200_000, what="used.idx == 1")
    out["tx_used_ms"] = round((time.monotonic() - started) * 1e3, 2)
    out["tx_queue_size"] = size
    out["tx_used_len_id"] = int.from_bytes(view[RING["used"] + 4:RING["used"] + 8], "little")
    out["tx_payload"] = payload.decode()


def probe(out: dict, token: str) -> None:
    sysfs = Sysfs()
    out["iommu_enabled"] = sysfs.iommu_enabled()
    nics = [f for f in sysfs.functions() if (f.vendor, f.device) == (0x1AF4, 0x1041)]
    out["nics"] = [f.address for f in nics]
    assert len(nics) == 1, f"expected one 1af4:1041 function, found {out['nics']}"
    nic = nics[0]
    out.update(address=nic.address, iommu_group=nic.iommu_group, driver_before=nic.driver)

    started = time.monotonic()
    bound = sysfs.bind_vfio(nic.address)
    out["bind_s"] = round(time.monotonic() - started, 2)
    out["driver_bound"] = sysfs.function(nic.address).driver
    out["group_device_exists"] = os.path.exists(bound.group_device)

    fds_before = open_fds()
    started = time.monotonic()
    fn = VfioFunction(nic.address)
    out["open_s"] = round(time.monotonic() - started, 3)
    try:
        ident = fn.ids
        out["ids"] = {"vendor": ident.vendor, "device": ident.device,
                      "subsystem_vendor": ident.subsystem_vendor, "subsystem_device": ident.subsystem_device}
        out["command_register"] = fn.config_read(0x04, 2)
        out["regions"] = {str(i): {"flags": r.flags, "size": r.size, "mmap": r.mmappable}
                          for i, r in fn.regions.items()}
        out["bars"] = [b for b in range(6) if fn.region(b) is not None]

        caps = virtio_caps(fn)
        out["caps"] = {str(t): c for t, c in caps.items()}
        driver_view = walk_capabilities(fn)
        out["driver_caps_agree"] = (driver_view.common.bar, driver_view.common.offset) == (
            caps[ids.CAP_COMMON]["bar"], caps[ids.CAP_COMMON]["offset"])
        common = caps[ids.CAP_COMMON]["offset"]
        bar = fn.region(caps[ids.CAP_COMMON]["bar"])
        out["bar_mapped"] = bar.address_of(0) is not None

        out["reset_polls"] = reset(fn, bar, common)
        out["status_after_reset"] = bar.read8(common + ids.Common.DEVICE_STATUS)
        features = 0
        for select_ in (0, 1):
            bar.write32(common + ids.Common.DEVICE_FEATURE_SELECT, select_)
            features |= bar.read32(common + ids.Common.DEVICE_FEATURE) << (32 * select_)
        out["device_features"] = features
        out["num_queues"] = bar.read16(common + ids.Common.NUM_QUEUES)
        bar.write16(common + ids.Common.QUEUE_SELECT, 0)
        out["queue0_size"] = bar.read16(common + ids.Common.QUEUE_SIZE)

        area = fn.notify_area(caps[ids.CAP_NOTIFY]["bar"], caps[ids.CAP_NOTIFY]["offset"])
        out["notify_area"] = {"is_device_fd": area.fd == fn.device_fd, "size": area.size,
                              "offset": area.offset,
                              "region_offset": fn.regions[caps[ids.CAP_NOTIFY]["bar"]].offset}
        with mmap.mmap(area.fd, area.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=area.offset):
            out["notify_area_mmaps"] = True

        out["msix_vectors"] = fn.msix_vectors()
        efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
        try:
            fn.set_msix(efds[:2])
            out["msix_enabled_with_2"] = msix_enabled(fn)
            fn.set_msix(efds[:3])       # a different count: disable, then enable with 3
            fn.set_msix([efds[0], -1, efds[2]])  # same count: rebind in place
            try:
                fn.set_msix(efds + [efds[0], efds[1]])
            except HalError as e:
                out["msix_too_many_error"] = str(e)
            fn.set_msix([])
            out["msix_enabled_after_disable"] = msix_enabled(fn)

            with HostMemory(MEM_SIZE, "probe") as mem:
                started = time.monotonic()
                fn.dma_map(IOVA, mem, 0, MEM_SIZE)
                out["dma_map_ms"] = round((time.monotonic() - started) * 1e3, 2)
                try:
                    fn.dma_map(IOVA + MEM_SIZE // 2, mem, 0, MEM_SIZE // 2)
                except HalError as e:
                    out["dma_overlap_error"] = str(e)
                try:
                    fn.dma_map(IOVA + MEM_SIZE + 0x10, mem, 0, 0x1000)
                except HalError as e:
                    out["dma_misaligned_error"] = str(e)
                # A frame out through the vIOMMU, with its interrupt on vector 1.
                fn.set_msix(efds[:2])
                transmit_one(fn, bar, caps, mem, token, out)
                ready, _, _ = select.select([efds[1]], [], [], 5.0)
                out["tx_interrupt"] = bool(ready) and os.eventfd_read(efds[1]) >= 1
                out["reset_polls_after_tx"] = reset(fn, bar, common)
                fn.set_msix([])
                fn.dma_unmap(IOVA, MEM_SIZE)
                out["dma_mappings_after_unmap"] = len(fn.dma_mappings())
                try:
                    fn.dma_unmap(IOVA, MEM_SIZE)
                except HalError as e:
                    out["dma_double_unmap_error"] = str(e)
        finally:
            for fd in efds:
                os.close(fd)
    finally:
        fn.close()
    out["fds_leaked"] = open_fds() - fds_before
    out["closed_fds"] = [fn.device_fd, fn.group_fd, fn.container_fd]
    # VFIO lets one process hold a group at a time: reopening works only if close released it.
    with VfioFunction(nic.address) as again:
        out["reopened_ids"] = [again.ids.vendor, again.ids.device]

    after = sysfs.unbind_vfio(nic.address)
    out["driver_after_unbind"] = after.driver
    try:
        VfioFunction(nic.address)
    except VfioError as e:
        out["open_unbound_error"] = str(e)


def main() -> int:
    path, token = sys.argv[1], sys.argv[2]
    out: dict = {"token": token}
    status = 0
    try:
        probe(out, token)
    except BaseException:
        out["error"] = traceback.format_exc()
        print(out["error"], flush=True)
        status = 1
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: v for k, v in out.items() if k != "error"}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
