"""`ifcvf devices`, `ifcvf bind`, `ifcvf unbind`: find VFs and hand them to vfio-pci."""
from __future__ import annotations

import argparse
import json

VFIO_EXPLAINED = """\
vfio-pci is the kernel driver that lets a user-space program own a PCI function:
it exposes the function's config space, BARs and interrupts through
/dev/vfio/GROUP and puts its DMA behind the IOMMU, so the function can reach
only the memory the program maps for it.  `ifcvf serve` needs each VF bound to
vfio-pci.  Binding takes the function away from its current kernel driver
(a VF used as a host NIC disappears from `ip link`).

The IOMMU isolates groups, not functions: VFIO opens a whole IOMMU group, and
only when every function in it is bound to vfio-pci (or pci-stub) or to no
driver.  SR-IOV VFs usually sit in a group of their own; if `ifcvf devices`
shows a group shared with other functions, bind those too.

The IOMMU must be on (intel_iommu=on or amd_iommu=on on the kernel command
line); without it there are no IOMMU groups and nothing can be bound.
"""

DEVICES_HELP = """\
List PCI functions that match the IFCVF ID table (vendor 1af4, subsystem
vendor 8086: N3000 net 1041/001a, C5000X-PL/F2000X-PL transitional net
1000/0001, blk 1001/0002, 1042/0002, 1042/0000), with their IOMMU group and
current driver.  --all-virtio also lists every other virtio-net function
(for example QEMU's virtio-net-pci in a test VM, which `ifcvf serve` drives
with devargs generic-virtio-net=1).

""" + VFIO_EXPLAINED

BIND_HELP = """\
Bind one PCI function to vfio-pci: load vfio-pci if needed, set the
function's driver_override to vfio-pci (so no other driver claims it again),
unbind it from its current driver and ask the kernel to probe it.  Then check
that its IOMMU group is usable: if other functions in the group are still
bound to host drivers, the command says which and fails (the function itself
stays bound).  Needs root.

""" + VFIO_EXPLAINED

UNBIND_HELP = """\
Give a function back from vfio-pci to the kernel: clear driver_override,
unbind it, and let the kernel probe it again, so its normal driver (e.g. the
virtio or NIC driver) takes it.  Needs root.
"""


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    devices = subparsers.add_parser("devices", help="list IFCVF functions, their IOMMU groups and drivers",
                                    description=DEVICES_HELP, formatter_class=fmt)
    devices.add_argument("--all-virtio", action="store_true",
                         help="also list virtio-net functions outside the IFCVF ID table")
    devices.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _sysfs_option(devices)
    devices.set_defaults(func=cmd_devices)

    bind = subparsers.add_parser("bind", help="bind a function to vfio-pci (needs root)",
                                 description=BIND_HELP, formatter_class=fmt)
    bind.add_argument("bdf", metavar="BDF", help="PCI address, e.g. 0000:3b:00.2")
    _sysfs_option(bind)
    bind.set_defaults(func=cmd_bind)

    unbind = subparsers.add_parser("unbind", help="give a function back from vfio-pci to the kernel",
                                   description=UNBIND_HELP, formatter_class=fmt)
    unbind.add_argument("bdf", metavar="BDF", help="PCI address, e.g. 0000:3b:00.2")
    _sysfs_option(unbind)
    unbind.set_defaults(func=cmd_unbind)


def _sysfs_option(parser) -> None:
    parser.add_argument("--sysfs", default="/sys", metavar="DIR",
                        help="where sysfs is mounted (default /sys; a copy for testing)")


def listed_functions(sysfs, all_virtio: bool) -> list[dict]:
    """The functions `ifcvf devices` shows, as plain dicts (the --json output)."""
    from ifcvf.ids import is_virtio_net, match_ifcvf

    rows = []
    for fn in sysfs.functions():
        entry = match_ifcvf(fn.vendor, fn.device, fn.subsystem_vendor, fn.subsystem_device)
        if entry is None and not (all_virtio and is_virtio_net(fn.vendor, fn.device, fn.subsystem_device)):
            continue
        members = [m for m in sysfs.group_members(fn.iommu_group) if m != fn.address] \
            if fn.iommu_group is not None else []
        rows.append({
            "address": fn.address,
            "vendor": f"{fn.vendor:04x}",
            "device": f"{fn.device:04x}",
            "subsystem_vendor": f"{fn.subsystem_vendor:04x}",
            "subsystem_device": f"{fn.subsystem_device:04x}",
            "name": entry.name if entry else "virtio-net (not IFCVF)",
            "ifcvf": entry is not None,
            "iommu_group": fn.iommu_group,
            "group_members": members,
            "driver": fn.driver,
            "net_interfaces": list(fn.net_interfaces),
        })
    return rows


def cmd_devices(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from hal.sysfs import IOMMU_ADVICE, Sysfs

    sysfs = Sysfs(args.sysfs)
    rows = listed_functions(sysfs, args.all_virtio)
    iommu = sysfs.iommu_enabled()
    if args.json:
        print(json.dumps({"iommu_enabled": iommu, "functions": rows}, indent=2))
        return 0
    console = Console()
    if not rows:
        console.print("No IFCVF functions found." if not args.all_virtio else
                      "No IFCVF or virtio-net functions found.")
        if not args.all_virtio:
            console.print("(--all-virtio also lists other virtio-net functions)")
    else:
        table = Table(title="IFCVF functions" if not args.all_virtio else "IFCVF and virtio-net functions")
        for column in ("BDF", "IDs", "subsystem", "name", "IOMMU group", "driver"):
            table.add_column(column, no_wrap=column in ("BDF", "IDs", "subsystem"))
        for row in rows:
            group = "-" if row["iommu_group"] is None else str(row["iommu_group"])
            if row["group_members"]:
                group += f" (+{len(row['group_members'])} other)"
            driver = row["driver"] or "(none)"
            if row["net_interfaces"]:
                driver += f" [{', '.join(row['net_interfaces'])}]"
            table.add_row(row["address"], f"{row['vendor']}:{row['device']}",
                          f"{row['subsystem_vendor']}:{row['subsystem_device']}",
                          row["name"], group, driver)
        console.print(table)
    if not iommu:
        console.print(f"[bold yellow]warning:[/] the IOMMU is off: no function can be bound to "
                      f"vfio-pci. {IOMMU_ADVICE}")
    return 0


def cmd_bind(args) -> int:
    from rich.console import Console

    from hal.sysfs import GroupNotViable, Sysfs, SysfsError

    console, err = Console(), Console(stderr=True)
    try:
        result = Sysfs(args.sysfs).bind_vfio(args.bdf)
    except GroupNotViable as e:
        err.print(f"[bold red]error:[/] the function is bound to vfio-pci, but {e}")
        return 1
    except SysfsError as e:
        err.print(f"[bold red]error:[/] {e}")
        return 1
    if result.previous_driver == result.driver:
        console.print(f"{result.address} is already bound to vfio-pci ({result.group_device})")
    else:
        console.print(f"{result.address}: {result.previous_driver or '(no driver)'} -> vfio-pci, "
                      f"IOMMU group {result.iommu_group} ({result.group_device})")
    return 0


def cmd_unbind(args) -> int:
    from rich.console import Console

    from hal.sysfs import Sysfs, SysfsError

    console, err = Console(), Console(stderr=True)
    try:
        result = Sysfs(args.sysfs).unbind_vfio(args.bdf)
    except SysfsError as e:
        err.print(f"[bold red]error:[/] {e}")
        return 1
    console.print(f"{result.address}: {result.previous_driver or '(no driver)'} -> "
                  f"{result.driver or '(no driver)'}")
    return 0
