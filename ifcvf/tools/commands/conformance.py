"""`ifcvf conformance`: run the conformance suite against one function."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

DESCRIPTION = """\
Check that a function behaves as the driver needs: identity and virtio
capabilities, reset, feature negotiation, queue programming, a kick that
completes a TX buffer and fires its MSI-X vector, stop and ring state, the
IFCVF live-migration block (or the reason it is absent).

DEVICE is `sim` (the simulated IFCVF) or a PCI address bound to vfio-pci
(`ifcvf bind BDF` first).  The function is reset by the suite: do not run it
on a VF that serves a guest.

  ifcvf conformance --device sim --junit out.xml
  sudo ifcvf conformance --device 0000:3b:00.2
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("conformance", help="check a function against what the driver needs",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", required=True, metavar="DEVICE", help="`sim` or a PCI address (vfio-pci)")
    parser.add_argument("--junit", type=Path, metavar="FILE", help="also write JUnit XML results")
    parser.add_argument("-k", metavar="EXPR", help="only tests matching EXPR (pytest -k)")
    parser.set_defaults(func=cmd_conformance)


class _Collector:
    """A pytest plugin that keeps each test's outcome for the summary table."""

    def __init__(self):
        self.results: list[tuple[str, str, float, str]] = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            reason = ""
            if report.failed:
                reason = str(report.longrepr.reprcrash.message if hasattr(report.longrepr, "reprcrash")
                             else report.longrepr).splitlines()[0][:120]
            name = report.nodeid.split("::")[-1]
            self.results.append((name, report.outcome, report.duration, reason))


def cmd_conformance(args) -> int:
    from ifcvf.tools.extras import require
    from ifcvf.tools.functions import is_sim

    require("conformance", "`ifcvf conformance`")
    if any(is_sim(d) for d in args.device.split(",")):
        require("sim", "`ifcvf conformance --device sim`")
    import pytest
    from rich.console import Console
    from rich.table import Table

    import ifcvf.tools.conformance.suite as suite

    os.environ["IFCVF_CONFORMANCE_DEVICES"] = args.device
    collector = _Collector()
    argv = [suite.__file__, "-q", "-p", "no:cacheprovider", "--no-header", "-rN"]
    if args.junit:
        argv.append(f"--junitxml={args.junit}")
    if args.k:
        argv += ["-k", args.k]
    code = pytest.main(argv, plugins=[collector])
    console = Console()
    table = Table(title=f"conformance of {args.device}")
    for col in ("test", "result", "seconds", "why"):
        table.add_column(col)
    style = {"passed": "green", "failed": "bold red", "skipped": "yellow"}
    for name, outcome, duration, reason in collector.results:
        table.add_row(name, f"[{style.get(outcome, '')}]{outcome}[/]", f"{duration:.3f}", reason)
    console.print(table)
    passed = sum(1 for r in collector.results if r[1] == "passed")
    console.print(f"{passed}/{len(collector.results)} passed" + (f"; JUnit XML in {args.junit}" if args.junit else ""))
    return int(code)
