"""`ifcvf serve`: the vhost-user back-end, one socket per VF."""
from __future__ import annotations

import argparse
import json
import logging
import signal

from ifcvf.tools.extras import require

log = logging.getLogger("ifcvf.serve")

DESCRIPTION = """\
Serve one vhost-user socket per VF.  When the front-end (QEMU, or DPDK
virtio-user) connects and the guest's virtio-net driver is ready, the VF is
configured to serve the guest's rings directly: guest memory is mapped into
the VF's own IOMMU domain (IOVA = guest-physical), MSI-X vectors are wired to
the guest's call eventfds, kicks are relayed to the VF's doorbells.

Give --socket and --device once per VF, in pairs, in the same order:

  ifcvf serve --socket /run/vf0.sock --device 0000:3b:00.2 --devargs vdpa=1
  ifcvf serve --socket /tmp/a.sock --device sim --socket /tmp/b.sock --device sim

A DEVICE is a PCI address bound to vfio-pci (see `ifcvf devices` and `ifcvf bind`)
or `sim` for a simulated IFCVF that follows the wall clock.

A simulated VF's 100G port is connected to nothing unless a --wire follows its
--device:
  --wire udp:LOCAL_PORT:REMOTE_PORT
                         frames the VF transmits go to 127.0.0.1:REMOTE_PORT as
                         UDP datagrams (one raw Ethernet frame each, no FCS);
                         datagrams arriving on 127.0.0.1:LOCAL_PORT are received
                         by the VF.  This is what QEMU's
                         `-netdev socket,udp=127.0.0.1:LOCAL_PORT,localaddr=127.0.0.1:REMOTE_PORT`
                         speaks, so a VM's NIC (or any UDP tool) can sit across
                         the wire.  Loopback only.

  ifcvf serve --socket /tmp/vf.sock --device sim --wire udp:5001:5002

Device arguments (--devargs, once for all VFs or once per VF):
  vdpa=1                 claim the function as a vDPA device (required)
  sw-live-migration=1    migrate through the software relay instead of the
                         VF's hardware dirty logging (needed when the VF has
                         no live-migration block)
  generic-virtio-net=1   also drive virtio-net functions outside the IFCVF ID
                         table, such as QEMU's virtio-net-pci

QEMU example (guest memory must be shared):
  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
  -chardev socket,id=c0,path=/run/vf0.sock -netdev vhost-user,id=n0,chardev=c0
  -device virtio-net-pci,netdev=n0
(QEMU 7.2 under TCG, no KVM: add vectors=0 to the -device, or QEMU crashes when
the guest enables MSI-X on a vhost NIC; the guest then uses INTx.)

SIGTERM or Ctrl-C stops the VFs and exits.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="run the vhost-user back-end for one or more VFs",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", action="append", default=[], metavar="PATH",
                        help="vhost-user socket path (created mode 0600 in server mode)")
    parser.add_argument("--device", action="append", default=[], metavar="DEVICE",
                        help="PCI address (vfio-pci) or `sim`")
    parser.add_argument("--wire", action=_WireAction, default={}, metavar="udp:LOCAL:REMOTE",
                        help="connect the port of the simulated VF given by the --device before "
                             "it to UDP on loopback (see above)")
    parser.add_argument("--devargs", action="append", default=[], metavar="ARGS",
                        help="device arguments, e.g. vdpa=1,sw-live-migration=1 (default vdpa=1)")
    parser.add_argument("--client", action="store_true",
                        help="connect to the socket (QEMU in server mode) and reconnect when it goes")
    parser.add_argument("--no-status", action="store_true",
                        help="do not offer the STATUS protocol feature (QEMU 7.2 orders messages "
                             "differently with it)")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the back-end's capabilities as JSON (vhost-user back-end "
                             "program conventions) and exit")
    parser.set_defaults(func=cmd_serve)


class _WireAction(argparse.Action):
    """``--wire`` belongs to the ``--device`` just before it: remember which one."""

    def __call__(self, parser, namespace, value, option_string=None):
        devices = getattr(namespace, "device", None) or []
        if not devices:
            parser.error("--wire must follow the --device it connects")
        wires = dict(getattr(namespace, self.dest, None) or {})
        index = len(devices) - 1
        if index in wires:
            parser.error(f"--device {devices[index]} has two --wire options")
        wires[index] = value
        setattr(namespace, self.dest, wires)


def capabilities() -> dict:
    return {"type": "net", "features": []}


def _pairs(args) -> list[tuple[str, str, str]]:
    if len(args.socket) != len(args.device) or not args.socket:
        raise SystemExit("ifcvf serve: give --socket and --device once per VF, in pairs "
                         f"(got {len(args.socket)} sockets, {len(args.device)} devices)")
    devargs = args.devargs or ["vdpa=1"]
    if len(devargs) == 1:
        devargs = devargs * len(args.device)
    if len(devargs) != len(args.device):
        raise SystemExit("ifcvf serve: give --devargs once for all VFs or once per VF")
    return list(zip(args.socket, args.device, devargs))


def _wire_specs(args) -> dict[int, tuple[int, int]]:
    """Device index -> (local, remote) UDP ports, checked before anything is opened."""
    from ifcvf.tools.functions import is_sim

    if not args.wire:
        return {}
    require("sim", "--wire (a simulated VF's port)")
    from sim.udpwire import WireSpecError, parse_wire

    specs = {}
    for index, spec in sorted(args.wire.items()):
        device = args.device[index]
        if not is_sim(device):
            raise SystemExit(f"ifcvf serve: --wire connects a simulated VF's port; "
                             f"{device} has a real one")
        try:
            specs[index] = parse_wire(spec)
        except WireSpecError as err:
            raise SystemExit(f"ifcvf serve: {err}") from None
    return specs


def open_wire(model, local: int, remote: int):
    """Join the port of the simulated VF ``model`` to UDP."""
    from sim.udpwire import UdpWire

    return UdpWire(model.world, model.port, local, remote, name=f"{model.name}.udp")


def cmd_serve(args) -> int:
    if args.print_capabilities:
        print(json.dumps(capabilities()))
        return 0
    from hal.api import HalError
    from ifcvf.devargs import DevargsError, parse
    from ifcvf.tools.functions import is_sim, open_function
    from ifcvf.vdpa import ProbeError, VdpaDevice
    from ifcvf.vhost.backend import VhostBackend
    from ifcvf.vhost.server import VhostServer

    pairs = _pairs(args)
    wires = _wire_specs(args)
    if any(is_sim(device) for _, device, _ in pairs):
        require("sim", "a simulated VF (`--device sim`)")
    world = None        # every simulated VF of this process shares one world
    models: list = []   # the simulated VFs, in --device order
    drivers = []
    links = []
    server = VhostServer()
    # Before anything is announced: whoever reads "serving ..." may SIGTERM at once.
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    try:
        for index, (path, device, devargs) in enumerate(pairs):
            try:
                fn = open_function(device, world=world, index=len(models))
                if is_sim(device):
                    world = fn.world
                    models.append(fn.model)
                if index in wires:
                    links.append(open_wire(models[-1], *wires[index]))
                    log.warning("%s (%s): wire %s", device, models[-1].name, links[-1].describe())
                driver = VdpaDevice(fn, parse(devargs))
            except (DevargsError, ProbeError, HalError, OSError) as err:
                log.error("%s: %s", device, err)
                return 1
            drivers.append(driver)
            server.add_endpoint(path, lambda d=driver, p=path: VhostBackend(
                d, name=p, status_feature=not args.no_status), client=args.client)
            log.warning("serving %s on %s (%s)", device, path, driver.kind)
        try:
            if world is not None:
                from sim.realtime import RealtimeClock
                clock = RealtimeClock(world)
                server.serve_forever(timeout=0.001, after=clock.sync)
            else:
                server.serve_forever()
        except Exception:
            log.critical("the event loop keeps failing; stopping every VF", exc_info=True)
            return 1
        return 0
    finally:
        # What the simulated VFs did (frames, drops, dirty-log marks), for whoever reads the log.
        for model in models:
            _cleanup(f"{model.name}: stats", _log_model_stats, model)
        for link in links:
            _cleanup(f"{link.name}: counters", lambda wire=link: log.info("%s: %s", wire.name, wire.counters()))
        # Each step on its own: one that fails must not leave the VFs after it running.
        _cleanup("closing the vhost-user server", server.close)
        for driver in drivers:
            _cleanup(f"closing {driver.name}", driver.close)
        for link in links:
            _cleanup(f"closing {link.name}", link.close)


def _log_model_stats(model) -> None:
    stats = model.datapath.stats()
    stats["queues"] = {q: c for q, c in stats["queues"].items() if c["rounds"] or c["dropped"]}
    log.info("%s: stats %s%s", model.name, stats, f", errors {model.errors}" if model.errors else "")


def _cleanup(what: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        log.error("%s failed", what, exc_info=True)

