"""The `ifcvf` command: parse, pick the backend, dispatch, render.

Each command lives in its own module exposing ``register(subparsers)``, which
adds its parser and sets ``func`` (``func(args) -> int`` exit status).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it adds); imported lazily so `ifcvf --help` stays fast and a
# command's heavy imports (simpy, cffi) load only when it runs.
COMMANDS = [
    "ifcvf.tools.commands.serve",
    "ifcvf.tools.commands.ctl",
    "ifcvf.tools.commands.sim",
    "ifcvf.tools.commands.conformance",
    "ifcvf.tools.commands.bench",
    "ifcvf.tools.commands.devices",
    "ifcvf.tools.commands.fuzz",
]

DESCRIPTION = """\
IFCVF vDPA driver: a vhost-user back-end that hands an Intel FPGA 100G
virtio-compatible VF (IFCVF) straight to a VM's virtio-net driver, keeps its
DMA inside the VM's memory, relays kicks and interrupts, and makes live
migration work with the VF's own dirty logging or a software relay.

Everything also runs against a cycle-level simulated VF (`--device sim`).
"""

EPILOG = """\
examples:
  ifcvf sim run scenarios/bringup.toml          bring a simulated VF up and down
  ifcvf sim run --help                          scenario options
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ifcvf", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ifcvf.tools.extras import MissingExtra, extra_providing
    from ifcvf.tools.logs import setup_logging
    setup_logging(args.verbose, getattr(args, "log_format", "text"))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except MissingExtra as err:
        print(f"ifcvf: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        # An optional extra's module imported past the command's own check.
        extra = extra_providing(err.name)
        if extra is None:
            raise
        print(f"ifcvf {args.command}: {MissingExtra(extra, err.name, 'this command')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
