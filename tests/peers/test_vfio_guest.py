"""hal.sysfs and hal.vfio on a device nobody here wrote: QEMU's virtio-net-pci behind a vIOMMU.

The guest binds the NIC to vfio-pci and drives it with the project's own code
(tests/peers/guest_vfio_probe.py); everything is asserted here, on the host,
from the JSON it writes and from the frame that reaches the host end of the
NIC's UDP netdev.
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from guest import NIC_MAC, NIC_SUBSYSTEM, NIC_VENDOR_DEVICE, GuestNet, host_python

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("guest_vfio_probe.py")
VERSION_1 = 1 << 32
ACCESS_PLATFORM = 1 << 33

pytestmark = [pytest.mark.peer, pytest.mark.slow]


@pytest.fixture(scope="module")
def probe(guest_env, tmp_path_factory):
    """Run the probe once in a fresh guest; the tests below read its results."""
    results = tmp_path_factory.mktemp("vfio-probe")
    token = secrets.token_hex(6)
    net = GuestNet()
    try:
        run = guest_env.run([host_python(), str(PROBE), str(results / "probe.json"), token],
                            timeout=300, results_dir=results, cwd=str(ROOT), net=net)
        frames = []
        while (frame := net.receive(timeout=0.5 if frames else 2.0)) is not None:
            frames.append(frame)
    finally:
        net.close()
    print(f"guest run: boot {run.boot_seconds:.1f} s, total {run.total_seconds:.1f} s")
    assert run.exit_status == 0, run.describe()
    data = json.loads((results / "probe.json").read_text())
    assert "error" not in data, data["error"]
    return {"run": run, "data": data, "token": token, "frames": frames}


def test_sysfs_finds_and_binds_the_nic(probe):
    d = probe["data"]
    assert d["iommu_enabled"] is True
    assert len(d["nics"]) == 1
    assert d["iommu_group"] is not None
    assert d["driver_before"] == "virtio-pci"
    assert d["driver_bound"] == "vfio-pci"
    assert d["group_device_exists"] is True


def test_ids_through_the_config_region(probe):
    ids = probe["data"]["ids"]
    assert (ids["vendor"], ids["device"]) == NIC_VENDOR_DEVICE
    assert (ids["subsystem_vendor"], ids["subsystem_device"]) == NIC_SUBSYSTEM
    # Opening enabled memory decoding and bus mastering.
    assert probe["data"]["command_register"] & 0x6 == 0x6


def test_regions_and_capabilities(probe):
    d = probe["data"]
    assert 4 in d["bars"] and d["regions"]["4"]["mmap"] and d["bar_mapped"]
    assert d["regions"]["7"]["size"] >= 256          # the config region
    common = d["caps"]["1"]
    assert (common["bar"], common["offset"]) == (4, 0)
    assert common["length"] >= 0x38
    assert d["caps"]["2"]["extra"] > 0               # notify_off_multiplier
    assert d["driver_caps_agree"] is True


def test_reset_and_exact_width_registers(probe):
    d = probe["data"]
    assert d["status_after_reset"] == 0 and d["reset_polls"] >= 1
    assert d["device_features"] & VERSION_1 and d["device_features"] & ACCESS_PLATFORM
    assert d["num_queues"] >= 2
    assert d["queue0_size"] > 0 and d["queue0_size"] & (d["queue0_size"] - 1) == 0


def test_notify_area_is_a_page_of_the_device_fd(probe):
    area = probe["data"]["notify_area"]
    assert area["is_device_fd"] and area["size"] == 4096
    assert area["offset"] % 4096 == 0 and area["offset"] >= area["region_offset"]
    assert probe["data"]["notify_area_mmaps"] is True


def test_msix_routing(probe):
    d = probe["data"]
    assert d["msix_vectors"] >= 2
    assert d["msix_enabled_with_2"] is True
    assert d["msix_enabled_after_disable"] is False
    assert "MSI-X vectors" in d["msix_too_many_error"]


def test_dma_map_unmap_and_refusals(probe):
    d = probe["data"]
    assert "overlaps the existing mapping" in d["dma_overlap_error"]
    assert "page aligned" in d["dma_misaligned_error"]
    assert d["dma_mappings_after_unmap"] == 0
    assert "no such mapping" in d["dma_double_unmap_error"]


def test_a_frame_goes_out_through_dma_and_interrupts(probe):
    d = probe["data"]
    assert d["features_ok"] is True
    assert d["status_after_driver_ok"] & 0x40 == 0, "device wants a reset: a register access was rejected"
    assert d["tx_queue_vector"] == 1
    assert d["tx_interrupt"] is True
    expected = f"ifcvf-guest-vfio-probe {probe['token']}".encode()
    sent = [f for f in probe["frames"] if f.endswith(expected)]
    assert len(sent) == 1, f"frames seen on the host: {probe['frames']!r}"
    assert sent[0][6:12] == bytes.fromhex(NIC_MAC.replace(":", ""))
    assert "wrong value" not in probe["run"].qemu_log


def test_close_releases_everything(probe):
    d = probe["data"]
    assert d["fds_leaked"] == 0
    assert d["closed_fds"] == [-1, -1, -1]
    assert d["reopened_ids"] == list(NIC_VENDOR_DEVICE)


def test_unbind_gives_the_nic_back(probe):
    d = probe["data"]
    assert d["driver_after_unbind"] == "virtio-pci"
    assert "ifcvf bind" in d["open_unbound_error"]
