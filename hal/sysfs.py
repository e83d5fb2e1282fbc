"""PCI functions as sysfs shows them: IDs, IOMMU groups, drivers; binding to vfio-pci.

Everything is read from a sysfs root given to ``Sysfs`` (``/sys`` by default),
so tests can point it at a fake tree.  Nothing here opens VFIO itself; that is
``hal.vfio``.

Binding uses ``driver_override``: the kernel then matches the function only
against the named driver, so a later rescan or a module reload cannot hand it
back to its old driver behind our back.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hal.api import HalError, PciIds

VFIO_PCI = "vfio-pci"
# Drivers the kernel accepts on the other members of a group handed to VFIO
# (besides vfio-pci itself and no driver at all).
VFIO_GROUP_ALLOWED_DRIVERS = ("pci-stub",)

_BDF = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")

IOMMU_ADVICE = ("Turn the IOMMU on: add intel_iommu=on (Intel VT-d) or amd_iommu=on (AMD-Vi) to "
                "the kernel command line (for GRUB: GRUB_CMDLINE_LINUX in /etc/default/grub, "
                "then update-grub and reboot; iommu=pt keeps host-owned devices fast), and make "
                "sure VT-d / AMD-Vi is enabled in the firmware setup.")


class SysfsError(HalError):
    """A sysfs query or binding step failed; the message says what to do."""


class FunctionMissing(SysfsError):
    pass


class IommuOff(SysfsError):
    pass


class NotRoot(SysfsError):
    pass


class GroupNotViable(SysfsError):
    """The function is bound, but other members of its IOMMU group keep the group unusable."""

    def __init__(self, message: str, blockers: list["PciFunctionInfo"]):
        super().__init__(message)
        self.blockers = blockers


def normalize_bdf(bdf: str) -> str:
    """``00:09.0`` or ``0000:00:09.0`` -> ``0000:00:09.0``; SysfsError if it is not a PCI address."""
    m = _BDF.match(bdf.strip().lower())
    if not m:
        raise SysfsError(f"{bdf!r} is not a PCI address: expected DDDD:BB:SS.F, e.g. 0000:3b:00.2")
    domain, bus, slot, fn = m.groups()
    return f"{domain or '0000'}:{bus}:{slot}.{fn}"


@dataclass(frozen=True)
class PciFunctionInfo:
    address: str
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int
    revision: int
    iommu_group: int | None
    driver: str | None
    driver_override: str | None = None
    header_type: int = 0
    net_interfaces: tuple[str, ...] = field(default=())

    @property
    def ids(self) -> PciIds:
        return PciIds(self.vendor, self.device, self.subsystem_vendor, self.subsystem_device,
                      self.revision, self.class_code)

    @property
    def is_bridge(self) -> bool:
        return self.header_type != 0

    @property
    def lets_group_be_used_by_vfio(self) -> bool:
        """The kernel's rule for the members of a group a VFIO user opens."""
        return (self.driver is None or self.driver.startswith("vfio")
                or self.driver in VFIO_GROUP_ALLOWED_DRIVERS or self.is_bridge)

    def describe(self) -> str:
        return f"{self.address} [{self.vendor:04x}:{self.device:04x}] driver {self.driver or '(none)'}"


@dataclass(frozen=True)
class BindResult:
    address: str
    previous_driver: str | None
    driver: str | None
    iommu_group: int | None

    @property
    def group_device(self) -> str | None:
        return None if self.iommu_group is None else f"/dev/vfio/{self.iommu_group}"


def _run_modprobe(module: str) -> None:
    try:
        subprocess.run(["modprobe", module], check=True, timeout=120,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except FileNotFoundError:
        raise SysfsError(f"cannot load {module}: modprobe is not installed (install kmod)") from None
    except subprocess.CalledProcessError as e:
        raise SysfsError(f"modprobe {module} failed: {(e.stderr or e.stdout).strip()}") from None
    except subprocess.TimeoutExpired:
        raise SysfsError(f"modprobe {module} did not finish in 120 s") from None


class Sysfs:
    """One sysfs tree.  ``euid`` and ``modprobe`` are injectable for tests."""

    def __init__(self, root: str | os.PathLike = "/sys", *,
                 euid: Callable[[], int] = os.geteuid,
                 modprobe: Callable[[str], None] = _run_modprobe):
        self.root = Path(root)
        self.devices = self.root / "bus/pci/devices"
        self.drivers = self.root / "bus/pci/drivers"
        self.groups = self.root / "kernel/iommu_groups"
        self._euid = euid
        self._modprobe = modprobe

    # --- queries ---------------------------------------------------------------
    def iommu_enabled(self) -> bool:
        """The kernel made IOMMU groups, i.e. an IOMMU is on and translating."""
        try:
            return any(self.groups.iterdir())
        except FileNotFoundError:
            return False

    def addresses(self) -> list[str]:
        try:
            return sorted(p.name for p in self.devices.iterdir())
        except FileNotFoundError:
            return []

    def functions(self) -> list[PciFunctionInfo]:
        out = []
        for address in self.addresses():
            try:
                out.append(self.function(address))
            except FunctionMissing:
                continue  # hot-removed while we listed
        return out

    def function(self, bdf: str) -> PciFunctionInfo:
        address = normalize_bdf(bdf)
        path = self.devices / address
        if not path.exists():
            raise FunctionMissing(
                f"no PCI function {address} in {self.devices}: check the address with "
                f"`lspci -D` or `ifcvf devices --all-virtio` (and that the VF exists: "
                f"VFs appear after writing the count to the PF's sriov_numvfs)")
        try:
            return PciFunctionInfo(
                address=address,
                vendor=_hex(path / "vendor"),
                device=_hex(path / "device"),
                subsystem_vendor=_hex(path / "subsystem_vendor", 0),
                subsystem_device=_hex(path / "subsystem_device", 0),
                class_code=_hex(path / "class", 0),
                revision=_hex(path / "revision", 0),
                iommu_group=_link_int(path / "iommu_group"),
                driver=_link_name(path / "driver"),
                driver_override=_override(path / "driver_override"),
                header_type=_header_type(path),
                net_interfaces=_net_interfaces(path),
            )
        except FileNotFoundError:
            raise FunctionMissing(f"PCI function {address} disappeared while it was read") from None

    def group_members(self, group: int) -> list[str]:
        try:
            return sorted(p.name for p in (self.groups / str(group) / "devices").iterdir())
        except FileNotFoundError:
            return []

    def group_blockers(self, bdf: str) -> list[PciFunctionInfo]:
        """Other functions in ``bdf``'s IOMMU group that keep VFIO from using the group."""
        info = self.function(bdf)
        if info.iommu_group is None:
            return []
        blockers = []
        for member in self.group_members(info.iommu_group):
            if member == info.address:
                continue
            try:
                other = self.function(member)
            except FunctionMissing:
                continue
            if not other.lets_group_be_used_by_vfio:
                blockers.append(other)
        return blockers

    def group_not_viable_message(self, info: PciFunctionInfo, blockers: list[PciFunctionInfo]) -> str:
        listed = "; ".join(b.describe() for b in blockers)
        return (f"IOMMU group {info.iommu_group} of {info.address} is not usable by VFIO: "
                f"it also holds {listed}. VFIO gives a whole group to one user, so every "
                f"function in it must be bound to vfio-pci (or pci-stub) or to no driver. "
                f"Bind them too (`ifcvf bind BDF`) or unbind them "
                f"(`echo BDF > {self.devices}/BDF/driver/unbind`). If they are functions you "
                f"need on the host, the slot does not isolate them; use another slot or an "
                f"ACS-capable switch.")

    # --- binding -----------------------------------------------------------------
    def require_iommu(self, info: PciFunctionInfo | None = None) -> None:
        if not self.iommu_enabled():
            raise IommuOff(f"the IOMMU is off ({self.groups} is empty), so vfio-pci cannot "
                           f"give a function its own DMA domain. {IOMMU_ADVICE}")
        if info is not None and info.iommu_group is None:
            raise IommuOff(f"{info.address} has no IOMMU group (no iommu_group link): the IOMMU "
                           f"does not cover it. {IOMMU_ADVICE}")

    def require_root(self, what: str) -> None:
        if self._euid() != 0:
            raise NotRoot(f"{what} needs root: it writes to {self.root}/bus/pci. "
                          f"Run it as root (sudo ifcvf ...).")

    def bind_vfio(self, bdf: str) -> BindResult:
        """Hand the function to vfio-pci; GroupNotViable (after binding) if its group is shared."""
        info = self.function(bdf)
        self.require_iommu(info)
        previous = info.driver
        if info.driver != VFIO_PCI:
            self.require_root(f"binding {info.address} to vfio-pci")
            if not (self.drivers / VFIO_PCI).exists():
                self._modprobe(VFIO_PCI)
                if not (self.drivers / VFIO_PCI).exists():
                    raise SysfsError(f"vfio-pci is not available: modprobe vfio-pci succeeded but "
                                     f"{self.drivers / VFIO_PCI} did not appear")
            path = self.devices / info.address
            self._write(path / "driver_override", VFIO_PCI)
            if info.driver is not None:
                self._write(path / "driver" / "unbind", info.address)
            self._write(self.root / "bus/pci/drivers_probe", info.address)
            info = self.function(info.address)
            if info.driver != VFIO_PCI:
                raise SysfsError(
                    f"{info.address} is bound to {info.driver or 'no driver'} after probing with "
                    f"driver_override=vfio-pci; see `dmesg` for why vfio-pci refused it")
        blockers = self.group_blockers(info.address)
        if blockers:
            raise GroupNotViable(self.group_not_viable_message(info, blockers), blockers)
        return BindResult(info.address, previous, info.driver, info.iommu_group)

    def unbind_vfio(self, bdf: str) -> BindResult:
        """Give the function back to the driver the kernel picks for it (e.g. its NIC driver)."""
        info = self.function(bdf)
        self.require_root(f"unbinding {info.address}")
        path = self.devices / info.address
        # An empty override (a bare newline) clears it, so normal matching applies again.
        self._write(path / "driver_override", "\n")
        if info.driver is not None:
            self._write(path / "driver" / "unbind", info.address)
        self._write(self.root / "bus/pci/drivers_probe", info.address)
        after = self.function(info.address)
        return BindResult(info.address, info.driver, after.driver, after.iommu_group)

    def _write(self, path: Path, value: str) -> None:
        try:
            with open(path, "w") as f:
                f.write(value)
        except PermissionError:
            raise NotRoot(f"writing {path} was refused: binding needs root (sudo ifcvf ...)") from None
        except FileNotFoundError:
            raise SysfsError(f"{path} does not exist: the kernel is too old for driver_override "
                             f"(needs 3.16+) or the function went away") from None
        except OSError as e:
            raise SysfsError(f"writing {value.strip()!r} to {path} failed: {e.strerror}") from None


# --- attribute readers --------------------------------------------------------
def _hex(path: Path, default: int | None = None) -> int:
    try:
        return int(path.read_text().strip(), 16)
    except FileNotFoundError:
        if default is None:
            raise
        return default


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _link_int(path: Path) -> int | None:
    name = _link_name(path)
    return int(name) if name is not None and name.isdigit() else None


def _override(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return None if value in ("", "(null)") else value


def _header_type(path: Path) -> int:
    """Header type from config space byte 0x0e (without the multi-function bit)."""
    try:
        with open(path / "config", "rb") as f:
            f.seek(0x0E)
            raw = f.read(1)
        if raw:
            return raw[0] & 0x7F
    except OSError:
        pass
    # No readable config: bridges are class 06 04 (PCI-PCI) / 06 09 (semi-transparent).
    klass = _hex(path / "class", 0)
    return 1 if klass >> 8 in (0x0604, 0x0609) else 0


def _net_interfaces(path: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in (path / "net").iterdir()))
    except OSError:
        return ()
