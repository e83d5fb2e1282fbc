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
  ifcvf serve --socket /tmp/a.sock --device sim \\
              --socket /tmp/b.sock --device sim

A DEVICE is a PCI address bound to vfio-pci (see `ifcvf devices` and `ifcvf
bind`) or `sim` for a simulated IFCVF that follows the wall clock.

A simulated VF's 100G port is connected to nothing unless a --wire follows its
--device:
  --wire udp:LOCAL_PORT:REMOTE_PORT
                         frames the VF transmits go to 127.0.0.1:REMOTE_PORT as
                         UDP datagrams (one raw Ethernet frame each, no FCS);
                         datagrams arriving on 127.0.0.1:LOCAL_PORT are
                         received by the VF. QEMU's socket netdev speaks this
                         (below), so a VM's NIC (or any UDP tool) can sit
                         across the wire. Loopback only. With more than one
                         queue pair in use, a received frame goes to the RX
                         queue of the pair its flow (MACs, IP addresses, L4
                         ports) last transmitted on, as a virtio-net device
                         without RSS steers (virtio 1.1 5.1.6.5.5); other flows
                         are spread over the pairs in use by a hash.

  ifcvf serve --socket /tmp/vf.sock --device sim --wire udp:5001:5002
  qemu-system-x86_64 ... \\
    -netdev socket,id=n1,udp=127.0.0.1:5001,localaddr=127.0.0.1:5002

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

Operating it:
  --control PATH         a control socket (0600) for `ifcvf ctl`: list the VFs,
                         read their statistics, add and remove VFs at run time
                         without disturbing the others
  --metrics HOST:PORT    Prometheus metrics at http://HOST:PORT/metrics
                         (names ifcvf_*; the `metrics` extra)
  --log-format json      one JSON object per log line (journald, log pipelines)

  ifcvf serve --socket /run/vf0.sock --device sim --control /run/ifcvf.ctl \\
              --metrics 127.0.0.1:9469
  ifcvf ctl --control /run/ifcvf.ctl add /run/vf1.sock sim
  ifcvf ctl --control /run/ifcvf.ctl list --json

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
    parser.add_argument("--control", metavar="PATH",
                        help="serve a control socket at PATH (created 0600) for `ifcvf ctl`: list, "
                             "stats, add and remove VFs at run time")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics "
                             "(the `metrics` extra: pip install 'ifcvf[metrics]')")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines as text, or one JSON object per line (journald, log pipelines)")
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


def cmd_serve(args) -> int:
    if args.print_capabilities:
        print(json.dumps(capabilities()))
        return 0
    from ifcvf.tools.daemon import AddError, Daemon
    from ifcvf.tools.functions import is_sim

    pairs = _pairs(args)
    _wire_specs(args)   # checked before anything is opened
    if any(is_sim(device) for _, device, _ in pairs):
        require("sim", "a simulated VF (`--device sim`)")
    metrics_address = _metrics_address(args.metrics) if args.metrics else None
    if metrics_address is not None:
        require("metrics", "--metrics (the Prometheus endpoint)")
    daemon = Daemon(client=args.client, status_feature=not args.no_status)
    server = daemon.server
    control = metrics = None
    # Before anything is announced: whoever reads "serving ..." may SIGTERM at once.
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    try:
        for index, (path, device, devargs) in enumerate(pairs):
            try:
                daemon.add(path, device, devargs, args.wire.get(index))
            except AddError as err:
                log.error("%s", err)
                return 1
        if args.control:
            from ifcvf.tools.control import ControlServer
            try:
                control = ControlServer(args.control, daemon)
            except OSError as err:
                log.error("control socket %s: %s", args.control, err)
                return 1
            log.warning("control socket on %s", args.control)
        if metrics_address is not None:
            from ifcvf.tools.metrics import MetricsServer
            try:
                metrics = MetricsServer(daemon, *metrics_address)
            except OSError as err:
                log.error("metrics on %s:%s: %s", *metrics_address, err)
                return 1
            log.warning("metrics on http://%s:%d/metrics", metrics.host, metrics.port)
        try:
            daemon.serve_forever()
        except Exception:
            log.critical("the event loop keeps failing; stopping every VF", exc_info=True)
            return 1
        return 0
    finally:
        if metrics is not None:
            _cleanup("stopping the metrics endpoint", metrics.close)
        if control is not None:
            _cleanup("closing the control socket", control.close)
        daemon.close()


def _metrics_address(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SystemExit(f"ifcvf serve: --metrics wants HOST:PORT (e.g. 127.0.0.1:9469), not {spec!r}")
    return host, int(port)


def _cleanup(what: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        log.error("%s failed", what, exc_info=True)
