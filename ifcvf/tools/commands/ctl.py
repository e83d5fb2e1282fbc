"""`ifcvf ctl`: talk to a running `ifcvf serve --control PATH`."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

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
        rows = [[vf["socket"], vf["device"], vf["state"], "yes" if vf["connected"] else "no",
                 vf["features"], ",".join(map(str, vf["queues"])) or "-", vf["devargs"]]
                for vf in result]
        return "\n".join(_columns(["SOCKET", "DEVICE", "STATE", "CONN", "FEATURES", "QUEUES",
                                   "DEVARGS"], rows))
    if cmd == "stats":
        vfs = result if isinstance(result, list) else [result]
        return "\n\n".join(_render_vf(vf) for vf in vfs) or "no VF served"
    if cmd == "add":
        return f"serving {result['device']} on {result['socket']} ({result['kind']})"
    if cmd == "remove":
        return f"removed {result['socket']}"
    return json.dumps(result)


def _columns(header: list[str], rows: list[list], right: int = 0, indent: str = "") -> list[str]:
    """Lines of a text table, each column as wide as its widest cell (values are
    exact, however large, and small ones fit an 80-column terminal); the columns
    from index ``right`` on are right-aligned (0: none)."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if right and i >= right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append((indent + " ".join(parts)).rstrip())
    return lines


def _render_vf(vf: dict) -> str:
    m = vf["migration"]
    lines = [f"{vf.get('socket', vf['name'])}: {vf['kind']}, {vf['state']}, features {vf['features']}"]
    lines += textwrap.wrap(f"migration: {m['mode']}, phase {m['phase']}, {m['migrations']} started, "
                           f"{m['switch_overs']} switch-overs, {m['pauses']} pauses, last pre-copy "
                           f"{_s(m['last_precopy_s'])}, last downtime {_s(m['last_downtime_s'])}",
                           78, initial_indent="  ", subsequent_indent="    ")
    rows, notes = [], []
    for q in vf["queues"]:
        d, dev = q["driver"], q["device"] or {}
        rows.append([q["index"], q["direction"], "yes" if q["running"] else "no", d["kicks"],
                     d["interrupts"], d["relayed"], d["polls"], d["pages_logged"],
                     dev.get("frames", "-"), dev.get("bytes", "-"), dev.get("dropped", "-"),
                     dev.get("bad_descriptors", "-")])
        # Why the device dropped what it dropped (the reasons that happened), and a
        # broken queue's reason, under the queue.
        why = [f"{reason} {count}" for reason, count in sorted(dev.get("drops", {}).items()) if count]
        notes.append(([f"     drops: {', '.join(why)}"] if why else [])
                     + ([f"     broken: {q['broken']}"] if q["broken"] else []))
    table = _columns(["Q", "DIR", "RUN", "KICKS", "INTR", "RELAYED", "POLLS", "PAGES", "FRAMES",
                      "BYTES", "DROPS", "BADDESC"], rows, right=3, indent="  ")
    lines.append(table[0])
    for line, under in zip(table[1:], notes):
        lines.append(line)
        lines += under
    return "\n".join(lines)


def _s(value) -> str:
    return "-" if value is None else f"{value * 1e3:.3f} ms"
