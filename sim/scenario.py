"""Scenario files (TOML): loaded, validated, and turned into frozen settings.

A bad file gets an error naming the file, the key, the value and what is
allowed; nothing half-loaded escapes.  Sections and keys are declared once in
SCHEMA, which is also what ``ifcvf sim run --help`` and the README describe.

The [device] section is not declared here: its keys are the fields of
``sim.config.IfcvfConfig`` and its own validation applies.
"""
from __future__ import annotations

import dataclasses
import os
import stat
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message says where and why."""


@dataclass(frozen=True)
class Key:
    name: str
    type: type
    default: Any
    help: str
    allowed: Callable[[Any], bool] | None = None
    allowed_text: str = ""
    choices: tuple = ()


def _range(lo, hi):
    return (lambda v: lo <= v <= hi), f"{lo}..{hi}"


def _pow2(lo, hi):
    return (lambda v: lo <= v <= hi and v & (v - 1) == 0), f"a power of two in {lo}..{hi}"


def _key(name, type_, default, help, *, check=None, choices=()):
    allowed, text = check if check else (None, "")
    return Key(name, type_, default, help, allowed, text, tuple(choices))


KINDS = ("bringup", "traffic", "migration")

SCHEMA: dict[str, list[Key]] = {
    "": [
        _key("name", str, "", "short name shown in reports"),
        _key("description", str, "", "what the scenario shows"),
        _key("kind", str, "bringup", "what to run", choices=KINDS),
        _key("seed", int, 1, "seed of every random stream in the run", check=_range(0, 2**63 - 1)),
    ],
    "driver": [
        _key("devargs", str, "vdpa=1", "device arguments, as DPDK takes them"),
        _key("queue_pairs", int, 1, "queue pairs the guest enables", check=_range(1, 32)),
        _key("queue_size", int, 256, "ring size of every queue", check=_pow2(2, 32768)),
        _key("ring_base", int, 0, "index the rings start (or resume) at", check=_range(0, 0xFFFF)),
        _key("guest_memory_mib", int, 64, "guest RAM in MiB", check=_range(4, 16384)),
        _key("guest_used_fraction", float, 1.0, "share of the guest RAM beyond its rings and "
             "buffers that it wrote before the run (kernel, page cache, heap); the rest was never "
             "written and migrates as zero pages, as in QEMU", check=_range(0.0, 1.0)),
        _key("front_end", str, "qemu-7.2", "whose vhost-user message order",
             choices=("qemu-7.2", "dpdk-virtio-user")),
        _key("status", bool, True, "offer the STATUS protocol feature"),
        _key("interrupts", str, "msix", "guest interrupt delivery: one MSI-X vector per queue, "
             "or INTx (one shared line, ISR read, every queue scanned)", choices=("msix", "intx")),
        _key("event_idx", bool, True, "the guest accepts VIRTIO_F_EVENT_IDX when offered"),
        _key("guest_cost_scale", float, 1.0, "guest CPU time per interrupt, poll and frame, as a "
             "multiple of a lean kernel on a modern core (about 50: a guest under TCG)",
             check=_range(0.01, 1000.0)),
        _key("napi_budget", int, 64, "guest NAPI budget (packets per poll)", check=_range(1, 1024)),
        _key("rx_alloc_fail", float, 0.0, "chance that a guest RX refill (GFP_ATOMIC) runs out of "
             "memory, so refill_work refills later", check=_range(0.0, 1.0)),
        _key("guest_announce", bool, True, "the guest accepts VIRTIO_NET_F_GUEST_ANNOUNCE (with "
             "CTRL_VQ): after a migration it announces itself when QEMU asks"),
    ],
    "network": [
        _key("switch_latency_ns", float, 500.0, "the L2 switch between the tester and the VFs: "
             "pipeline latency (store and forward)", check=_range(0.0, 1e6)),
        _key("aging_s", float, 300.0, "the switch's MAC ageing time, s (802.1D default)",
             check=_range(1e-6, 1e6)),
        _key("announce_initial_ms", float, 50.0, "QEMU announce-initial", check=_range(0.0, 100000.0)),
        _key("announce_max_ms", float, 550.0, "QEMU announce-max", check=_range(0.0, 100000.0)),
        _key("announce_rounds", int, 5, "QEMU announce-rounds", check=_range(0, 1000)),
        _key("announce_step_ms", float, 100.0, "QEMU announce-step", check=_range(1.0, 10000.0)),
    ],
    "traffic": [
        _key("rx_gbps", float, 0.0, "load offered from the wire to the guest, Gb/s", check=_range(0.0, 400.0)),
        _key("tx_gbps", float, 0.0, "load the guest sends, Gb/s", check=_range(0.0, 400.0)),
        _key("rx_pps", float, 0.0, "instead of rx_gbps: frames/s offered to the guest (low rates)",
             check=_range(0.0, 1e7)),
        _key("tx_pps", float, 0.0, "instead of tx_gbps: frames/s the guest sends (low rates)",
             check=_range(0.0, 1e7)),
        _key("pattern", str, "constant", "arrivals of the *_pps sources: evenly spaced, or Poisson "
             "(exponential gaps)", choices=("constant", "poisson")),
        _key("burst", int, 1, "frames back to back per arrival of the *_pps sources", check=_range(1, 512)),
        _key("on_us", float, 0.0, "on-off traffic: the *_pps sources send only during on periods "
             "this long (0: always on)", check=_range(0.0, 1e8)),
        _key("off_us", float, 0.0, "on-off traffic: silence after each on period", check=_range(0.0, 1e8)),
        _key("reply", bool, False, "the far end answers every frame the guest sends with one frame "
             "back (ping-like)"),
        _key("reply_delay_us", float, 20.0, "time the far end takes to answer", check=_range(0.0, 1e6)),
        _key("frame_size", int, 1518, "Ethernet frame size with FCS, bytes", check=_range(64, 1518)),
        _key("flows_per_pair", int, 2, "flows per queue pair and direction", check=_range(1, 64)),
        _key("warmup_us", float, 200.0, "traffic before anything else happens", check=_range(0.0, 1e7)),
        _key("duration_us", float, 1000.0, "traffic after the migration (or in all, without one)",
             check=_range(1.0, 1e8)),
    ],
    "migration": [
        _key("bandwidth_mib_s", float, 1024.0, "migration link bandwidth, MiB/s", check=_range(1.0, 1e6)),
        _key("downtime_limit_ms", float, 300.0, "QEMU's downtime-limit", check=_range(0.001, 1e5)),
        _key("max_iterations", int, 30, "give up (not converged) after this many", check=_range(1, 1000)),
        _key("cancel_after", int, 0, "cancel after this many iterations (0: never)", check=_range(0, 1000)),
        _key("back_and_forth", bool, False, "migrate A -> B, then back B -> A"),
        _key("guest_dirty_mib_s", float, 0.0, "rate the guest's CPU dirties its RAM, MiB/s",
             check=_range(0.0, 1e6)),
        _key("guest_dirty_set_mib", int, 8, "RAM the guest's workload writes into, MiB", check=_range(0, 16384)),
    ],
    "expect": [
        _key("converged", bool, True, "the migration converges (false: it must be reported as not)"),
        _key("cancelled", bool, False, "the migration was cancelled on purpose"),
        _key("max_rx_gap_us", float, 0.0, "liveness: longest a running RX queue with frames offered "
             "and buffers posted may go without a delivery (0: the default rule)",
             check=_range(0.0, 1e8)),
    ],
}


def _check_value(path: Path, section: str, key: Key, value):
    where = f"{path}: [{section}] {key.name}" if section else f"{path}: {key.name}"
    if key.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if key.type is int and isinstance(value, bool) or not isinstance(value, key.type):
        raise ScenarioError(f"{where} = {value!r}: expected {key.type.__name__}")
    if key.choices and value not in key.choices:
        raise ScenarioError(f"{where} = {value!r}: allowed values are {', '.join(map(str, key.choices))}")
    if key.allowed and not key.allowed(value):
        raise ScenarioError(f"{where} = {value!r}: allowed is {key.allowed_text}")
    return value


def _section(path: Path, name: str, table: dict, keys: list[Key]) -> dict:
    known = {k.name: k for k in keys}
    out = {}
    for k, v in table.items():
        if k not in known:
            where = f"[{name}] " if name else ""
            raise ScenarioError(f"{path}: {where}unknown key {k!r}; known keys: {', '.join(known)}")
        out[k] = _check_value(path, name, known[k], v)
    for k in keys:
        out.setdefault(k.name, k.default)
    return out


@dataclass(frozen=True)
class Scenario:
    path: Path
    name: str
    description: str
    kind: str
    seed: int
    device: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)

    def section(self, name: str) -> dict:
        return self.sections[name]

    def with_seed(self, seed: int) -> "Scenario":
        return dataclasses.replace(self, seed=seed)


def load(path: str | Path, *, extra_schema: dict[str, list[Key]] | None = None) -> Scenario:
    path = Path(path)
    return from_dict(path, read_toml(path, "scenario"), extra_schema=extra_schema)


# A scenario or sweep file is a few KiB; a path that names something else
# (/dev/zero, a FIFO nobody writes, a huge file) must not hang or fill memory.
MAX_TOML_BYTES = 1 << 20


def _read_file(path: Path, what: str) -> bytes:
    """The bytes of a regular file of at most MAX_TOML_BYTES; ScenarioError otherwise."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such {what} file") from None
    except ValueError as err:          # an embedded NUL: no file can have that name
        raise ScenarioError(f"{path!r}: not a usable path: {err}") from None
    except OSError as err:
        raise ScenarioError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ScenarioError(f"{path}: cannot read: not a regular file")
        data = os.read(fd, MAX_TOML_BYTES + 1)
    except OSError as err:
        raise ScenarioError(f"{path}: cannot read: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TOML_BYTES:
        raise ScenarioError(f"{path}: larger than {MAX_TOML_BYTES} bytes; not a {what} file")
    return data


def read_toml(path: Path, what: str = "scenario") -> dict:
    data = _read_file(path, what)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ScenarioError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path}: not valid TOML: {err}") from None
    except RecursionError:             # tomllib recurses per nesting level
        raise ScenarioError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None


def from_dict(path: Path, raw: dict, *, extra_schema: dict[str, list[Key]] | None = None) -> Scenario:
    """A scenario from its TOML tables (``path`` names it in errors and reports)."""
    path = Path(path)
    schema = dict(SCHEMA)
    schema.update(extra_schema or {})
    top_keys = schema[""]
    tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
    scalars = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    top = _section(path, "", scalars, top_keys)
    sections = {}
    for name, table in tables.items():
        if name == "device":
            continue
        if name not in schema:
            allowed = ", ".join(["device"] + [s for s in schema if s])
            raise ScenarioError(f"{path}: unknown section [{name}]; known sections: {allowed}")
    for name, keys in schema.items():
        if name:
            sections[name] = _section(path, name, tables.get(name, {}), keys)
    device = tables.get("device", {})
    _check_device(path, device)
    _check_together(path, sections)
    return Scenario(path, top["name"] or path.stem, top["description"], top["kind"], top["seed"],
                    device, sections)


def _check_device(path: Path, device: dict) -> None:
    from sim.config import IfcvfConfig

    names = {f.name for f in dataclasses.fields(IfcvfConfig)}
    for key in device:
        if key not in names:
            raise ScenarioError(f"{path}: [device] unknown key {key!r}; known keys: {', '.join(sorted(names))}")
    try:
        device_config(device)
    except (TypeError, ValueError) as err:
        raise ScenarioError(f"{path}: [device] {err}") from None


def _check_together(path: Path, sections: dict) -> None:
    """Keys that are valid alone but not together."""
    n = sections.get("network")
    if n and n["announce_max_ms"] < n["announce_initial_ms"]:
        raise ScenarioError(f"{path}: [network] announce_max_ms = {n['announce_max_ms']!r}: allowed "
                            f"is at least announce_initial_ms ({n['announce_initial_ms']!r})")
    t = sections.get("traffic")
    if not t:
        return
    for d in ("rx", "tx"):
        if t[f"{d}_gbps"] and t[f"{d}_pps"]:
            raise ScenarioError(f"{path}: [traffic] {d}_gbps = {t[f'{d}_gbps']!r} and {d}_pps = "
                                f"{t[f'{d}_pps']!r}: give one of them")
    if t["off_us"] and not t["on_us"]:
        raise ScenarioError(f"{path}: [traffic] off_us = {t['off_us']!r}: allowed only with on_us > 0")
    if t["reply"] and not (t["tx_gbps"] or t["tx_pps"]):
        raise ScenarioError(f"{path}: [traffic] reply = true: the guest sends nothing to answer "
                            "(set tx_pps or tx_gbps)")


def device_config(device: dict):
    """An IfcvfConfig from a [device] table (layout "qemu" starts from QEMU's defaults)."""
    from sim.config import IfcvfConfig

    settings = dict(device)
    if settings.pop("layout", "ifcvf") == "qemu":
        return IfcvfConfig.qemu_virtio_net(**settings)
    return IfcvfConfig(**settings)


def describe_schema(width: int | None = None) -> str:
    """Human-readable list of sections and keys (for --help and the README); with
    ``width``, each key's text is wrapped to it under its description column."""
    lines = []
    for name, keys in SCHEMA.items():
        lines.append(f"[{name}]" if name else "top level")
        for k in keys:
            allowed = k.allowed_text or (", ".join(map(str, k.choices)) if k.choices else k.type.__name__)
            line = f"  {k.name + ' = ' + repr(k.default):<28} {k.help} ({allowed})"
            if width is None:
                lines.append(line)
            else:
                lines.extend(textwrap.wrap(line, width, subsequent_indent=" " * 31,
                                           break_long_words=False, break_on_hyphens=False))
    lines.append("[device]\n  any field of sim.config.IfcvfConfig (queue_pairs, max_queue_size, ...)")
    return "\n".join(lines)
