"""`ifcvf ctl`: talk to a running `ifcvf serve --control PATH`."""
from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Control a running `ifcvf serve` through its control socket (--control PATH):

  list                    each VF: socket, device, devargs, state, features,
                          queues
  stats [SOCKET [QUEUE]]  counters of every VF, of one, or of one of its queues
  add SOCKET DEVICE [--devargs ARGS] [--wire udp:LOCAL:REMOTE]
                          serve one more VF, without disturbing the others
  remove SOCKET           stop serving one VF (its front-end is disconnected)

--json prints the daemon's answer as JSON (list: a JSON list, one object per
VF).  Exit status: 0 done, 1 refused (the reason on stderr; nothing changed),
2 no daemon.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("ctl", help="list, inspect, add and remove the VFs of a running ifcvf serve",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", required=True, metavar="PATH",
                        help="the control socket `ifcvf serve --control PATH` created")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for the answer (default 10)")
    sub = parser.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)
    json_opt = dict(action="store_true", default=argparse.SUPPRESS, help="print the answer as JSON")
    p = sub.add_parser("list", help="each VF served")
    p.add_argument("--json", **json_opt)
    p = sub.add_parser("stats", help="counters of every VF, one VF, or one queue")
    p.add_argument("socket", nargs="?", metavar="SOCKET")
    p.add_argument("queue", nargs="?", type=int, metavar="QUEUE")
    p.add_argument("--json", **json_opt)
    p = sub.add_parser("add", help="serve one more VF")
    p.add_argument("socket", metavar="SOCKET")
    p.add_argument("device", metavar="DEVICE", help="PCI address (vfio-pci) or `sim`")
    p.add_argument("--devargs", default="vdpa=1", metavar="ARGS")
    p.add_argument("--wire", metavar="udp:LOCAL:REMOTE", help="a simulated VF's port over UDP")
    p.add_argument("--json", **json_opt)
    p = sub.add_parser("remove", help="stop serving one VF")
    p.add_argument("socket", metavar="SOCKET")
    p.add_argument("--json", **json_opt)
    parser.set_defaults(func=cmd_ctl)


def build_request(args) -> dict:
    cmd = args.ctl_command
    req: dict = {"cmd": cmd}
    if cmd == "stats":
        if args.socket is not None:
            req["socket"] = args.socket
        if args.queue is not None:
            req["queue"] = args.queue
    elif cmd == "add":
        req.update(socket=args.socket, device=args.device, devargs=args.devargs)
        if args.wire:
            req["wire"] = args.wire
    elif cmd == "remove":
        req["socket"] = args.socket
    return req


def cmd_ctl(args) -> int:
    from ifcvf.tools.control import ControlUnavailable, request

    try:
        response = request(args.control, build_request(args), timeout=args.timeout)
    except ControlUnavailable as err:
        print(f"ifcvf ctl: {err}", file=sys.stderr)
        return 2
    if not response.get("ok"):
        print(f"ifcvf ctl: {args.ctl_command}: {response.get('error', 'refused')}", file=sys.stderr)
        return 1
    result = response.get("result")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(args.ctl_command, result))
    return 0


def render(cmd: str, result) -> str:
    if cmd == "list":
        if not result:
            return "no VF served"
        lines = [f"{'SOCKET':30} {'DEVICE':14} {'STATE':10} {'CONN':4} {'FEATURES':18} QUEUES  DEVARGS"]
        for vf in result:
            lines.append(f"{vf['socket']:30} {vf['device']:14} {vf['state']:10} "
                         f"{'yes' if vf['connected'] else 'no':4} {vf['features']:18} "
                         f"{','.join(map(str, vf['queues'])) or '-':7} {vf['devargs']}")
        return "\n".join(lines)
    if cmd == "stats":
        vfs = result if isinstance(result, list) else [result]
        return "\n\n".join(_render_vf(vf) for vf in vfs) or "no VF served"
    if cmd == "add":
        return f"serving {result['device']} on {result['socket']} ({result['kind']})"
    if cmd == "remove":
        return f"removed {result['socket']}"
    return json.dumps(result)


def _render_vf(vf: dict) -> str:
    m = vf["migration"]
    lines = [f"{vf.get('socket', vf['name'])}: {vf['kind']}, {vf['state']}, features {vf['features']}",
             f"  migration: {m['mode']}, phase {m['phase']}, {m['migrations']} started, "
             f"{m['switch_overs']} switch-overs, {m['pauses']} pauses, last pre-copy "
             f"{_s(m['last_precopy_s'])}, last downtime {_s(m['last_downtime_s'])}"]
    header = (f"  {'Q':>2} {'DIR':3} {'RUN':3} {'KICKS':>9} {'INTR':>9} {'RELAYED':>9} {'POLLS':>9} "
              f"{'PAGES':>9} {'FRAMES':>11} {'BYTES':>14} {'DROPS':>8} {'BADDESC':>7}")
    lines.append(header)
    for q in vf["queues"]:
        d, dev = q["driver"], q["device"] or {}
        lines.append(f"  {q['index']:>2} {q['direction']:3} {'yes' if q['running'] else 'no':3} "
                     f"{d['kicks']:>9} {d['interrupts']:>9} {d['relayed']:>9} {d['polls']:>9} "
                     f"{d['pages_logged']:>9} {dev.get('frames', '-'):>11} {dev.get('bytes', '-'):>14} "
                     f"{dev.get('dropped', '-'):>8} {dev.get('bad_descriptors', '-'):>7}"
                     + (f"  broken: {q['broken']}" if q["broken"] else ""))
        # Why the device dropped what it dropped: the reasons that happened, under the queue.
        why = [f"{reason} {count}" for reason, count in sorted(dev.get("drops", {}).items()) if count]
        if why:
            lines.append(f"     drops: {', '.join(why)}")
    return "\n".join(lines)


def _s(value) -> str:
    return "-" if value is None else f"{value * 1e3:.3f} ms"
