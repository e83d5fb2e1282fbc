"""Device arguments, as DPDK's IFCVF driver takes them: ``vdpa=1,sw-live-migration=1``.

Values are read like C's ``strtoul(value, NULL, 0)`` (decimal, ``0x`` hex,
leading ``0`` octal) into 16 bits.  Where strtoul would silently read
``vdpa=yes`` as 0 (and leave the device unclaimed), we refuse with the key and
value instead: a typo should not look like a decision.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

KEYS = {
    "vdpa": "1 claims the function as a vDPA device (required)",
    "sw-live-migration": "1 migrates through the software relay instead of the VF's dirty logging",
    "generic-virtio-net": "1 also drives virtio-net functions outside the IFCVF ID table "
                          "(such as QEMU's virtio-net-pci): no hardware logging there",
}

_NUMBER = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\s*")


class DevargsError(ValueError):
    """Malformed device arguments; the message names the key and value."""


@dataclass(frozen=True)
class Devargs:
    vdpa: bool = False
    sw_live_migration: bool = False
    generic_virtio_net: bool = False

    def __str__(self) -> str:
        parts = [f"vdpa={int(self.vdpa)}"]
        if self.sw_live_migration:
            parts.append("sw-live-migration=1")
        if self.generic_virtio_net:
            parts.append("generic-virtio-net=1")
        return ",".join(parts)


def strtoul16(key: str, value: str) -> int:
    m = _NUMBER.fullmatch(value)
    if not m:
        raise DevargsError(f"devargs: {key}={value!r} is not a number (decimal, 0x hex or 0 octal)")
    sign, digits = m.groups()
    number = int(digits, 16 if digits[:2].lower() == "0x" else 8 if digits.startswith("0") and len(digits) > 1 else 10)
    if sign == "-" or number > 0xFFFF:
        raise DevargsError(f"devargs: {key}={value!r} is outside 0..65535")
    return number


def parse(text: str | None) -> Devargs:
    """Parse ``key=value[,key=value...]``; unknown or repeated keys are errors."""
    values: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in KEYS:
            known = ", ".join(KEYS)
            raise DevargsError(f"devargs: unknown key {key!r} (known keys: {known})")
        if not sep:
            raise DevargsError(f"devargs: {key} needs a value, e.g. {key}=1")
        if key in values:
            raise DevargsError(f"devargs: {key} given twice")
        values[key] = strtoul16(key, value)
    return Devargs(vdpa=bool(values.get("vdpa", 0)),
                   sw_live_migration=bool(values.get("sw-live-migration", 0)),
                   generic_virtio_net=bool(values.get("generic-virtio-net", 0)))
