"""The VFIO ioctl structures and numbers in hal.vfio_ioctl match the kernel ABI.

Two oracles: the layout the kernel's uapi header defines (written out below,
field by field), and, when a C compiler and <linux/vfio.h> are installed, the
header itself compiled into a program that prints sizeof/offsetof.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hal import vfio_ioctl as V

# struct name -> (size, {field: offset}), from include/uapi/linux/vfio.h.
KERNEL_LAYOUT = {
    "vfio_group_status": (V.GroupStatus, 8, {"argsz": 0, "flags": 4}),
    "vfio_device_info": (V.DeviceInfo, 20, {"argsz": 0, "flags": 4, "num_regions": 8, "num_irqs": 12,
                                            "cap_offset": 16}),
    "vfio_region_info": (V.RegionInfo, 32, {"argsz": 0, "flags": 4, "index": 8, "cap_offset": 12,
                                            "size": 16, "offset": 24}),
    "vfio_irq_info": (V.IrqInfo, 16, {"argsz": 0, "flags": 4, "index": 8, "count": 12}),
    "vfio_irq_set": (V.IrqSetHeader, 20, {"argsz": 0, "flags": 4, "index": 8, "start": 12, "count": 16}),
    "vfio_iommu_type1_dma_map": (V.DmaMap, 32, {"argsz": 0, "flags": 4, "vaddr": 8, "iova": 16, "size": 24}),
    "vfio_iommu_type1_dma_unmap": (V.DmaUnmap, 24, {"argsz": 0, "flags": 4, "iova": 8, "size": 16}),
}

REQUESTS = {
    "VFIO_GET_API_VERSION": 0x3B64, "VFIO_CHECK_EXTENSION": 0x3B65, "VFIO_SET_IOMMU": 0x3B66,
    "VFIO_GROUP_GET_STATUS": 0x3B67, "VFIO_GROUP_SET_CONTAINER": 0x3B68,
    "VFIO_GROUP_UNSET_CONTAINER": 0x3B69, "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
    "VFIO_DEVICE_GET_INFO": 0x3B6B, "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C,
    "VFIO_DEVICE_GET_IRQ_INFO": 0x3B6D, "VFIO_DEVICE_SET_IRQS": 0x3B6E, "VFIO_DEVICE_RESET": 0x3B6F,
    "VFIO_IOMMU_GET_INFO": 0x3B70, "VFIO_IOMMU_MAP_DMA": 0x3B71, "VFIO_IOMMU_UNMAP_DMA": 0x3B72,
}

CONSTANTS = {
    "VFIO_API_VERSION": 0, "VFIO_TYPE1_IOMMU": 1, "VFIO_TYPE1v2_IOMMU": 3, "VFIO_NOIOMMU_IOMMU": 8,
    "VFIO_GROUP_FLAGS_VIABLE": 1, "VFIO_GROUP_FLAGS_CONTAINER_SET": 2,
    "VFIO_DEVICE_FLAGS_RESET": 1, "VFIO_DEVICE_FLAGS_PCI": 2,
    "VFIO_REGION_INFO_FLAG_READ": 1, "VFIO_REGION_INFO_FLAG_WRITE": 2, "VFIO_REGION_INFO_FLAG_MMAP": 4,
    "VFIO_IRQ_SET_DATA_NONE": 1, "VFIO_IRQ_SET_DATA_BOOL": 2, "VFIO_IRQ_SET_DATA_EVENTFD": 4,
    "VFIO_IRQ_SET_ACTION_MASK": 8, "VFIO_IRQ_SET_ACTION_UNMASK": 16, "VFIO_IRQ_SET_ACTION_TRIGGER": 32,
    "VFIO_DMA_MAP_FLAG_READ": 1, "VFIO_DMA_MAP_FLAG_WRITE": 2,
    "VFIO_PCI_CONFIG_REGION_INDEX": 7, "VFIO_PCI_ROM_REGION_INDEX": 6,
    "VFIO_PCI_INTX_IRQ_INDEX": 0, "VFIO_PCI_MSI_IRQ_INDEX": 1, "VFIO_PCI_MSIX_IRQ_INDEX": 2,
}


@pytest.mark.parametrize("name", sorted(KERNEL_LAYOUT))
def test_struct_layout_matches_the_kernel(name):
    cls, size, offsets = KERNEL_LAYOUT[name]
    assert ctypes.sizeof(cls) == size
    assert {f: getattr(cls, f).offset for f in offsets} == offsets
    assert [f for f, _ in cls._fields_] == list(offsets)


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_numbers(name):
    assert getattr(V, name) == REQUESTS[name]


def test_constants():
    assert {k: getattr(V, k) for k in CONSTANTS} == CONSTANTS


def test_argsz_is_filled_in():
    assert V.RegionInfo(index=4).argsz == 32
    assert V.DmaMap().argsz == 32 and V.DmaUnmap().argsz == 24 and V.GroupStatus().argsz == 8


def test_irq_set_packs_eventfds_after_the_header():
    req = V.irq_set(V.VFIO_PCI_MSIX_IRQ_INDEX, V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER,
                    0, [5, -1, 9])
    assert bytes(req) == struct.pack("<5I3i", 32, 0x24, 2, 0, 3, 5, -1, 9)


def test_irq_set_disable_has_no_data():
    req = V.irq_set(V.VFIO_PCI_MSIX_IRQ_INDEX, V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER, 0)
    assert bytes(req) == struct.pack("<5I", 20, 0x21, 2, 0, 0)


def test_region_info_reads_back_what_the_kernel_writes():
    req = V.RegionInfo(index=4)
    raw = struct.pack("<4I2Q", 32, 7, 4, 0, 0x4000, 4 << 40)
    ctypes.memmove(ctypes.addressof(req), raw, len(raw))
    assert (req.flags, req.index, req.size, req.offset) == (7, 4, 0x4000, 4 << 40)


def test_ioctl_failure_raises_oserror_with_errno(tmp_path):
    path = tmp_path / "not-a-device"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as err:
            V.ioctl(fd, V.VFIO_GET_API_VERSION)
        assert err.value.errno == errno.ENOTTY
        with pytest.raises(OSError):
            V.ioctl(fd, V.VFIO_GROUP_GET_STATUS, V.GroupStatus())
    finally:
        os.close(fd)


def test_raw_mmap_roundtrip(tmp_path):
    fd = os.memfd_create("bar")
    try:
        os.ftruncate(fd, 3 * 4096)
        addr = V.mmap_shared(fd, 8192, 4096)
        ctypes.c_uint32.from_address(addr + 8).value = 0xDEADBEEF
        V.munmap(addr, 8192)
        assert os.pread(fd, 4, 4096 + 8) == struct.pack("<I", 0xDEADBEEF)
        with pytest.raises(OSError):
            V.mmap_shared(fd, 4096, 123)   # unaligned offset: EINVAL
    finally:
        os.close(fd)


HEADER_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/vfio.h>
#define S(t) printf("\"%s\": [%zu", #t, sizeof(struct t));
#define F(t, f) printf(", [\"%s\", %zu]", #f, offsetof(struct t, f));
#define E printf("],\n");
int main(void) {
  printf("{\n");
  S(vfio_group_status) F(vfio_group_status, argsz) F(vfio_group_status, flags) E
  S(vfio_device_info) F(vfio_device_info, flags) F(vfio_device_info, num_regions)
    F(vfio_device_info, num_irqs) F(vfio_device_info, cap_offset) E
  S(vfio_region_info) F(vfio_region_info, index) F(vfio_region_info, cap_offset)
    F(vfio_region_info, size) F(vfio_region_info, offset) E
  S(vfio_irq_info) F(vfio_irq_info, index) F(vfio_irq_info, count) E
  S(vfio_irq_set) F(vfio_irq_set, index) F(vfio_irq_set, start) F(vfio_irq_set, count) F(vfio_irq_set, data) E
  S(vfio_iommu_type1_dma_map) F(vfio_iommu_type1_dma_map, vaddr) F(vfio_iommu_type1_dma_map, iova)
    F(vfio_iommu_type1_dma_map, size) E
  S(vfio_iommu_type1_dma_unmap) F(vfio_iommu_type1_dma_unmap, iova) F(vfio_iommu_type1_dma_unmap, size) E
  printf("\"requests\": [%lu, %lu, %lu, %lu, %lu, %lu, %lu]\n}\n",
         (unsigned long)VFIO_GET_API_VERSION, (unsigned long)VFIO_GROUP_GET_DEVICE_FD,
         (unsigned long)VFIO_DEVICE_GET_REGION_INFO, (unsigned long)VFIO_DEVICE_SET_IRQS,
         (unsigned long)VFIO_IOMMU_MAP_DMA, (unsigned long)VFIO_IOMMU_UNMAP_DMA,
         (unsigned long)VFIO_GROUP_SET_CONTAINER);
  return 0;
}
"""


def test_layout_against_the_installed_kernel_header(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/vfio.h").exists():
        pytest.skip("needs a C compiler and <linux/vfio.h> (linux-libc-dev) to compile the header")
    src = tmp_path / "layout.c"
    src.write_text(HEADER_PROGRAM)
    subprocess.run([cc, "-o", str(tmp_path / "layout"), str(src)], check=True, timeout=60)
    got = json.loads(subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True,
                                    text=True, timeout=30).stdout)
    for name, (cls, _, _) in KERNEL_LAYOUT.items():
        size, *fields = got[name]
        if name == "vfio_irq_set":
            assert dict(fields)["data"] == ctypes.sizeof(cls)   # data[] follows the header directly
            fields = [f for f in fields if f[0] != "data"]
        if name == "vfio_device_info":
            # Newer headers pad it to 24; the kernel accepts any argsz >= 16.
            assert size >= ctypes.sizeof(cls)
        else:
            assert size == ctypes.sizeof(cls), name
        for field, offset in fields:
            assert getattr(cls, field).offset == offset, f"{name}.{field}"
    assert got["requests"] == [V.VFIO_GET_API_VERSION, V.VFIO_GROUP_GET_DEVICE_FD,
                               V.VFIO_DEVICE_GET_REGION_INFO, V.VFIO_DEVICE_SET_IRQS,
                               V.VFIO_IOMMU_MAP_DMA, V.VFIO_IOMMU_UNMAP_DMA, V.VFIO_GROUP_SET_CONTAINER]
