"""The README's systemd unit and libvirt interface work with `ifcvf serve` as written:
the unit's ExecStart parses as an `ifcvf serve` command line, the libvirt XML is
well-formed, and the two agree on the socket and on who listens."""
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

from ifcvf.tools.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def block(lang: str, marker: str) -> str:
    for m in re.finditer(rf"```{lang}\n(.*?)```", README.read_text(), re.S):
        if marker in m.group(1):
            return m.group(1)
    raise AssertionError(f"no ```{lang} block with {marker!r} in the README")


def test_systemd_unit_and_libvirt_interface_agree_with_the_cli():
    unit = block("ini", "ExecStart=")
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", unit.replace("\\\n", " "), re.M).group(1)
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/ifcvf")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.client
    assert args.log_format == "json" and args.control and args.metrics
    assert len(args.socket) == len(args.device) == 1
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.M)

    xml = block("xml", "<interface type='vhostuser'>").replace("  ...\n", "")
    domain = ET.fromstring(xml)
    assert domain.find("memoryBacking/access").get("mode") == "shared"
    assert domain.find("memoryBacking/source").get("type") == "memfd"
    source = domain.find("devices/interface/source")
    assert source.get("type") == "unix"
    assert source.get("path") == args.socket[0]
    # QEMU listens (mode='server') exactly when ifcvf serve connects (--client).
    assert (source.get("mode") == "server") == args.client


def test_documented_ctl_commands_exist():
    parser = build_parser()
    for line in block("", "ifcvf ctl --control").splitlines():
        if line.startswith("ifcvf ctl"):
            argv = shlex.split(line.split("#")[0])[1:]
            args = parser.parse_args(argv)
            assert args.command == "ctl" and args.ctl_command in ("list", "stats", "add", "remove")
