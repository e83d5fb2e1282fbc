"""hal.sysfs and `ifcvf devices/bind/unbind` against a fake sysfs tree in tmp_path.

The tree has the shape the kernel gives: /sys/bus/pci/devices/<bdf> symlinks
into /sys/devices, iommu_group and driver symlinks, driver_override reading
"(null)".  ``FakeKernel`` plays the kernel's part for the files binding
writes (unbind, drivers_probe, driver_override), so the whole sequence runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hal.sysfs import (FunctionMissing, GroupNotViable, IommuOff, NotRoot, Sysfs, SysfsError,
                       normalize_bdf)
from ifcvf.tools.cli import main

IFCVF = "0000:3b:00.2"       # N3000 VF: 1af4:1041 subsystem 8086:001a
QEMU_NIC = "0000:00:04.0"    # QEMU virtio-net-pci: 1af4:1041 subsystem 1af4:1100
INTEL_NIC = "0000:00:19.0"   # not virtio at all
BRIDGE = "0000:00:1c.0"


class Tree:
    """Builds a fake /sys under ``root``."""

    def __init__(self, root: Path, iommu: bool = True):
        self.root = root
        self.devices = root / "bus/pci/devices"
        self.drivers = root / "bus/pci/drivers"
        self.groups = root / "kernel/iommu_groups"
        for d in (self.devices, self.drivers, self.groups, root / "devices/pci0000:00"):
            d.mkdir(parents=True, exist_ok=True)
        (root / "bus/pci/drivers_probe").write_text("")
        self.iommu = iommu

    def driver(self, name: str) -> Path:
        d = self.drivers / name
        d.mkdir(exist_ok=True)
        for f in ("bind", "unbind"):
            (d / f).touch()
        return d

    def add(self, bdf: str, vendor: int, device: int, subvendor: int, subdevice: int, *,
            klass: int = 0x020000, group: int | None = None, driver: str | None = None,
            header_type: int = 0, net: tuple[str, ...] = ()) -> Path:
        real = self.root / "devices/pci0000:00" / bdf
        real.mkdir()
        for name, value in (("vendor", vendor), ("device", device), ("subsystem_vendor", subvendor),
                            ("subsystem_device", subdevice)):
            (real / name).write_text(f"0x{value:04x}\n")
        (real / "class").write_text(f"0x{klass:06x}\n")
        (real / "revision").write_text("0x01\n")
        (real / "driver_override").write_text("(null)\n")
        config = bytearray(64)
        config[0x0E] = header_type
        (real / "config").write_bytes(bytes(config))
        for iface in net:
            (real / "net" / iface).mkdir(parents=True)
        os.symlink(f"../../../devices/pci0000:00/{bdf}", self.devices / bdf)
        if group is not None and self.iommu:
            members = self.groups / str(group) / "devices"
            members.mkdir(parents=True, exist_ok=True)
            os.symlink(f"../../../../devices/pci0000:00/{bdf}", members / bdf)
            os.symlink(f"../../../kernel/iommu_groups/{group}", real / "iommu_group")
        if driver:
            self.bind(bdf, driver)
        return real

    def bind(self, bdf: str, driver: str) -> None:
        self.driver(driver)
        link = self.devices / bdf / "driver"
        if link.is_symlink():
            link.unlink()
        os.symlink(f"../../../bus/pci/drivers/{driver}", link)


class FakeKernel(Sysfs):
    """Sysfs whose writes also get the kernel's reaction, recorded in ``writes``."""

    def __init__(self, tree: Tree, *, native: dict[str, str], refuse_vfio: bool = False, **kw):
        kw.setdefault("euid", lambda: 0)
        kw.setdefault("modprobe", self._fake_modprobe)
        super().__init__(tree.root, **kw)
        self.tree = tree
        self.native = native          # bdf -> the driver the kernel picks without an override
        self.refuse_vfio = refuse_vfio
        self.writes: list[tuple[str, str]] = []
        self.modprobed: list[str] = []

    def _fake_modprobe(self, module: str) -> None:
        self.modprobed.append(module)
        self.tree.driver(module)

    def _write(self, path: Path, value: str) -> None:
        super()._write(path, value)
        rel = str(path.relative_to(self.root))
        self.writes.append((rel, value))
        if rel.endswith("/driver_override") and value.strip() == "":
            path.write_text("(null)\n")
        elif rel.endswith("/driver/unbind"):
            (self.devices / value / "driver").unlink()
        elif rel == "bus/pci/drivers_probe":
            override = (self.devices / value / "driver_override").read_text().strip()
            want = self.native.get(value) if override == "(null)" else override
            if want and not (want == "vfio-pci" and self.refuse_vfio) and (self.drivers / want).exists():
                self.tree.bind(value, want)


@pytest.fixture
def tree(tmp_path) -> Tree:
    t = Tree(tmp_path / "sys")
    t.driver("vfio-pci")
    t.add(IFCVF, 0x1AF4, 0x1041, 0x8086, 0x001A, group=41, driver="virtio-pci", net=("eth1",))
    t.add(QEMU_NIC, 0x1AF4, 0x1041, 0x1AF4, 0x1100, group=4, driver="virtio-pci")
    t.add(INTEL_NIC, 0x8086, 0x15B8, 0x8086, 0x0000, group=7, driver="e1000e")
    t.add(BRIDGE, 0x8086, 0xA110, 0x8086, 0x0000, klass=0x060400, group=7, driver="pcieport",
          header_type=1)
    return t


NATIVE = {IFCVF: "virtio-pci", QEMU_NIC: "virtio-pci", INTEL_NIC: "e1000e"}


# --- queries ---------------------------------------------------------------
def test_functions_read_ids_groups_and_drivers(tree):
    fns = {f.address: f for f in Sysfs(tree.root).functions()}
    assert sorted(fns) == sorted([IFCVF, QEMU_NIC, INTEL_NIC, BRIDGE])
    vf = fns[IFCVF]
    assert (vf.vendor, vf.device, vf.subsystem_vendor, vf.subsystem_device) == (0x1AF4, 0x1041, 0x8086, 0x001A)
    assert vf.class_code == 0x020000 and vf.revision == 1
    assert vf.iommu_group == 41 and vf.driver == "virtio-pci"
    assert vf.driver_override is None         # "(null)" means unset
    assert vf.net_interfaces == ("eth1",)
    assert fns[BRIDGE].is_bridge and not vf.is_bridge
    assert str(vf.ids).startswith("1af4:1041 (subsystem 8086:001a")


def test_group_members_and_iommu_state(tree, tmp_path):
    sysfs = Sysfs(tree.root)
    assert sysfs.iommu_enabled()
    assert sysfs.group_members(7) == sorted([INTEL_NIC, BRIDGE])
    off = Tree(tmp_path / "off", iommu=False)
    off.add(QEMU_NIC, 0x1AF4, 0x1041, 0x1AF4, 0x1100, group=4, driver="virtio-pci")
    assert not Sysfs(off.root).iommu_enabled()
    assert Sysfs(off.root).function(QEMU_NIC).iommu_group is None
    assert not Sysfs(tmp_path / "nothing").iommu_enabled()
    assert Sysfs(tmp_path / "nothing").functions() == []


@pytest.mark.parametrize("given, expected", [
    ("00:04.0", "0000:00:04.0"), ("0000:3B:00.2", "0000:3b:00.2"), (" 0001:00:1f.7 ", "0001:00:1f.7")])
def test_normalize_bdf(given, expected):
    assert normalize_bdf(given) == expected


@pytest.mark.parametrize("bad", ["", "eth0", "00:04", "0000:00:04.8", "00:20.0", "0:00:04.0"])
def test_normalize_bdf_rejects_non_addresses(bad):
    with pytest.raises(SysfsError, match="not a PCI address"):
        normalize_bdf(bad)


# --- binding ----------------------------------------------------------------
def test_bind_uses_driver_override_unbind_and_probe_in_that_order(tree):
    k = FakeKernel(tree, native=NATIVE)
    result = k.bind_vfio("00:04.0")
    assert (result.previous_driver, result.driver, result.iommu_group) == ("virtio-pci", "vfio-pci", 4)
    assert result.group_device == "/dev/vfio/4"
    assert k.writes == [
        (f"bus/pci/devices/{QEMU_NIC}/driver_override", "vfio-pci"),
        (f"bus/pci/devices/{QEMU_NIC}/driver/unbind", QEMU_NIC),
        ("bus/pci/drivers_probe", QEMU_NIC),
    ]
    assert k.function(QEMU_NIC).driver_override == "vfio-pci"
    assert k.modprobed == []


def test_bind_of_a_bound_function_writes_nothing(tree):
    tree.bind(QEMU_NIC, "vfio-pci")
    k = FakeKernel(tree, native=NATIVE)
    result = k.bind_vfio(QEMU_NIC)
    assert result.previous_driver == result.driver == "vfio-pci"
    assert k.writes == []


def test_bind_loads_vfio_pci_when_missing(tree):
    (tree.drivers / "vfio-pci" / "bind").unlink()
    (tree.drivers / "vfio-pci" / "unbind").unlink()
    (tree.drivers / "vfio-pci").rmdir()
    k = FakeKernel(tree, native=NATIVE)
    assert k.bind_vfio(QEMU_NIC).driver == "vfio-pci"
    assert k.modprobed == ["vfio-pci"]


def test_bind_fails_clearly_when_modprobe_does_not_provide_vfio_pci(tree):
    (tree.drivers / "vfio-pci" / "bind").unlink()
    (tree.drivers / "vfio-pci" / "unbind").unlink()
    (tree.drivers / "vfio-pci").rmdir()
    k = FakeKernel(tree, native=NATIVE, modprobe=lambda module: None)
    with pytest.raises(SysfsError, match="vfio-pci is not available"):
        k.bind_vfio(QEMU_NIC)


def test_bind_reports_when_vfio_pci_refuses(tree):
    k = FakeKernel(tree, native=NATIVE, refuse_vfio=True)
    with pytest.raises(SysfsError, match="dmesg") as err:
        k.bind_vfio(QEMU_NIC)
    assert "no driver" in str(err.value)


def test_bind_with_the_iommu_off_says_how_to_turn_it_on(tmp_path):
    off = Tree(tmp_path / "sys", iommu=False)
    off.add(QEMU_NIC, 0x1AF4, 0x1041, 0x1AF4, 0x1100, group=4, driver="virtio-pci")
    k = FakeKernel(off, native=NATIVE)
    with pytest.raises(IommuOff) as err:
        k.bind_vfio(QEMU_NIC)
    assert "intel_iommu=on" in str(err.value) and "amd_iommu=on" in str(err.value)
    assert k.writes == []


def test_bind_as_non_root_says_so_and_writes_nothing(tree):
    k = FakeKernel(tree, native=NATIVE, euid=lambda: 1000)
    with pytest.raises(NotRoot, match="needs root"):
        k.bind_vfio(QEMU_NIC)
    assert k.writes == []


def test_bind_of_a_missing_function_names_it(tree):
    with pytest.raises(FunctionMissing, match="0000:00:05.0"):
        FakeKernel(tree, native=NATIVE).bind_vfio("00:05.0")


def test_shared_group_is_not_viable_and_the_error_names_the_other_members(tree):
    shared = tree.add("0000:00:19.1", 0x1AF4, 0x1041, 0x8086, 0x001A, group=7, driver="virtio-pci")
    assert shared.exists()
    k = FakeKernel(tree, native={**NATIVE, "0000:00:19.1": "virtio-pci"})
    with pytest.raises(GroupNotViable) as err:
        k.bind_vfio("0000:00:19.1")
    message = str(err.value)
    assert INTEL_NIC in message and "e1000e" in message
    assert BRIDGE not in message               # a bridge on pcieport does not block VFIO
    assert "bind them" in message.lower() and "unbind" in message
    assert [b.address for b in err.value.blockers] == [INTEL_NIC]
    assert k.function("0000:00:19.1").driver == "vfio-pci"   # bound all the same


def test_group_members_without_a_driver_or_on_pci_stub_do_not_block(tree):
    tree.add("0000:00:19.1", 0x1AF4, 0x1041, 0x8086, 0x001A, group=7, driver="virtio-pci")
    (tree.devices / INTEL_NIC / "driver").unlink()
    k = FakeKernel(tree, native={"0000:00:19.1": "virtio-pci"})
    assert k.bind_vfio("0000:00:19.1").driver == "vfio-pci"
    tree.bind(INTEL_NIC, "pci-stub")
    assert k.group_blockers("0000:00:19.1") == []


def test_unbind_clears_the_override_and_lets_the_kernel_reprobe(tree):
    k = FakeKernel(tree, native=NATIVE)
    k.bind_vfio(QEMU_NIC)
    k.writes.clear()
    result = k.unbind_vfio(QEMU_NIC)
    assert (result.previous_driver, result.driver) == ("vfio-pci", "virtio-pci")
    assert k.writes == [
        (f"bus/pci/devices/{QEMU_NIC}/driver_override", "\n"),
        (f"bus/pci/devices/{QEMU_NIC}/driver/unbind", QEMU_NIC),
        ("bus/pci/drivers_probe", QEMU_NIC),
    ]
    assert k.function(QEMU_NIC).driver_override is None


def test_permission_denied_on_a_write_becomes_a_root_hint(tree, monkeypatch):
    def refuse(path, mode="r", *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    k = FakeKernel(tree, native=NATIVE)
    monkeypatch.setattr("hal.sysfs.open", refuse, raising=False)
    with pytest.raises(NotRoot, match="needs root") as err:
        k.bind_vfio(QEMU_NIC)
    assert "driver_override" in str(err.value)


def test_a_failed_write_names_the_file(tree):
    k = FakeKernel(tree, native=NATIVE)
    override = tree.devices / QEMU_NIC / "driver_override"
    override.unlink()
    override.mkdir()    # writing a directory fails: a plain OSError
    with pytest.raises(SysfsError, match="driver_override.*failed"):
        k.bind_vfio(QEMU_NIC)


# --- the CLI ------------------------------------------------------------------
def test_devices_json_lists_only_ifcvf_by_default(tree, capsys):
    assert main(["devices", "--json", "--sysfs", str(tree.root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["iommu_enabled"] is True
    assert [f["address"] for f in out["functions"]] == [IFCVF]
    vf = out["functions"][0]
    assert vf["name"] == "IFCVF net (N3000)" and vf["ifcvf"] is True
    assert (vf["iommu_group"], vf["driver"], vf["net_interfaces"]) == (41, "virtio-pci", ["eth1"])
    assert vf["group_members"] == []


def test_devices_all_virtio_adds_other_virtio_net_but_not_other_nics(tree, capsys):
    assert main(["devices", "--all-virtio", "--json", "--sysfs", str(tree.root)]) == 0
    out = json.loads(capsys.readouterr().out)
    by_addr = {f["address"]: f for f in out["functions"]}
    assert sorted(by_addr) == sorted([IFCVF, QEMU_NIC])
    assert by_addr[QEMU_NIC]["ifcvf"] is False and by_addr[QEMU_NIC]["iommu_group"] == 4


def test_devices_table_shows_address_group_and_driver(tree, capsys):
    assert main(["devices", "--all-virtio", "--sysfs", str(tree.root)]) == 0
    out = capsys.readouterr().out
    for text in (IFCVF, QEMU_NIC, "1af4:1041", "8086:001a", "virtio-pci", "41", "N3000"):
        assert text in out
    assert "IOMMU is off" not in out


def test_devices_warns_when_the_iommu_is_off(tmp_path, capsys):
    off = Tree(tmp_path / "sys", iommu=False)
    off.add(IFCVF, 0x1AF4, 0x1041, 0x8086, 0x001A, group=41, driver="virtio-pci")
    assert main(["devices", "--sysfs", str(off.root)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "IOMMU is off" in out and "intel_iommu=on" in out


def test_devices_says_when_nothing_matches(tmp_path, capsys):
    empty = Tree(tmp_path / "sys")
    assert main(["devices", "--sysfs", str(empty.root)]) == 0
    out = capsys.readouterr().out
    assert "No IFCVF functions found" in out and "--all-virtio" in out


def test_bind_cli_reports_errors_with_exit_status_1(tree, capsys):
    assert main(["bind", "00:05.0", "--sysfs", str(tree.root)]) == 1
    assert "no PCI function 0000:00:05.0" in " ".join(capsys.readouterr().err.split())


def test_unbind_cli_rejects_a_bad_address(tree, capsys):
    assert main(["unbind", "eth0", "--sysfs", str(tree.root)]) == 1
    assert "not a PCI address" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["devices", "bind", "unbind"])
def test_help_explains_vfio_and_iommu_groups(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "vfio-pci" in out
    if command != "unbind":
        assert "IOMMU group" in out and "every function in it" in out
