"""PCIe arithmetic for `ifcvf bench sim`: bytes per frame by the TLP rules of
``sim.pcie_link``, the link's capacity, and the explanation of what binds each
direction and why, in numbers (printed under the table and written to --json).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ifcvf.tools.benchmarks.measure import FullResult


def tlp_bytes(link, hdr_len: int, size: int) -> dict:
    """PCIe bytes per frame for its data alone (header + frame, no rings), by the
    TLP rules of sim.pcie_link: RX = posted writes split at MPS; TX = read
    requests split at MRRS upstream, completions split at MPS (or RCB) downstream."""
    from sim.pcie_link import CPL_OVERHEAD, REQ_BYTES, WRITE_OVERHEAD
    n = hdr_len + size - 4
    writes = -(-n // link.mps)
    reqs = -(-n // link.mrrs)
    cpls = -(-n // link.cpl_unit)
    return {"bytes": n, "writes": writes, "rx_up": n + WRITE_OVERHEAD * writes,
            "reqs": reqs, "tx_up": REQ_BYTES * reqs, "cpls": cpls,
            "tx_down": n + CPL_OVERHEAD * cpls, "write_overhead": WRITE_OVERHEAD,
            "req_bytes": REQ_BYTES, "cpl_overhead": CPL_OVERHEAD}


def explain_link(link) -> str:
    """The PCIe capacity every explanation refers to."""
    return (f"PCIe Gen{link.gen} x{link.lanes} leaves {link.gbps:.1f} Gb/s per direction for "
            f"TLPs ({float(link.raw) * 8 / 1e9:.1f} Gb/s after 128b/130b coding, minus "
            f"ACK/UpdateFC DLLPs and SKP ordered sets at MPS {link.mps}); a memory write TLP "
            f"costs 24 B beside its payload, a read request 24 B, a completion 20 B.")


def explain(label: int, dirs: dict, full: "FullResult | None", *, pairs: int,
            hdr_len: int = 12, link=None, costs=None, budget: int = 64) -> str:
    """Why each direction gets what it gets, in numbers (printed under the table, in --json)."""
    from sim.guest import GuestCosts
    rx, tx = dirs["rx"], dirs["tx"]
    costs = costs or GuestCosts()
    link = link or default_link()
    t = tlp_bytes(link, hdr_len, rx.frame_size)
    s_w = "s" if t["writes"] > 1 else ""
    s_c = "s" if t["cpls"] > 1 else ""
    rx_why = (f"{rx.up_per_frame:.0f} B upstream per frame: {t['bytes']} B of header + frame in "
              f"{t['writes']} write TLP{s_w} = {t['rx_up']} B, the rest used-ring writes and "
              f"ring/descriptor reads")
    tx_why = (f"{tx.down_per_frame:.0f} B downstream per frame: {t['cpls']} completion{s_c} "
              f"= {t['tx_down']} B, the rest descriptor and ring reads; plus "
              f"{tx.up_per_frame:.0f} B of read requests upstream")
    if rx.binds == "wire" and tx.binds == "wire":
        text = (f"{label} B: each direction alone reaches line rate, RX {rx.mpps:.3f} and TX "
                f"{tx.mpps:.3f} Mpps ({rx.of_line:.1%} and {tx.of_line:.1%} of "
                f"{rx.line_mpps:.3f} Mpps = 100 Gb/s on the wire): the wire binds.  RX costs "
                f"{rx_why}: {rx.pcie_up:.0%} of upstream.  TX costs {tx_why}: "
                f"{tx.pcie_down:.0%} of downstream.")
        need = rx.line_mpps * 1e6 * (rx.up_per_frame + tx.up_per_frame) * 8 / 1e9
        if need > rx.pcie_gbps:
            text += (f"  Both at once need ({rx.up_per_frame:.0f} + {tx.up_per_frame:.0f}) B "
                     f"upstream x {rx.line_mpps:.3f} Mpps = {need:.1f} Gb/s > "
                     f"{rx.pcie_gbps:.1f} Gb/s: upstream saturates, RX's posted writes go "
                     f"first and TX's read requests queue behind them, so TX falls short")
            if full is not None:
                text += (f" (full run: RX {full.rx_mpps:.2f} Mpps, TX {full.tx_mpps:.2f} Mpps "
                         f"= {full.tx_gbps:.1f} Gb/s of frames)")
            text += "."
        return text
    parts = []
    for r, name in ((rx, "RX"), (tx, "TX")):
        if r.binds == "wire":
            parts.append(f"{label} B {name} alone: {r.mpps:.3f} Mpps, line rate.")
            continue
        if r.binds == "guest":
            frame_ns, batch_ns = ((costs.rx_frame_ns, costs.poll_ns) if name == "RX"
                                  else (costs.tx_frame_ns, costs.tx_batch_ns))
            per_frame = frame_ns + batch_ns / budget
            text = (f"{label} B {name} alone: {r.mpps:.1f} Mpps, the guest's CPU binds (busiest "
                    f"core {r.guest:.0%}; {frame_ns:g} ns per frame + {batch_ns:g} ns per "
                    f"{'poll' if name == 'RX' else 'batch'} of up to {budget} = "
                    f"~{1e3 / per_frame:.1f} Mpps per core, x {pairs} pairs).")
        else:
            text = f"{label} B {name} alone: {r.mpps:.1f} Mpps, PCIe binds."
        text += (f"  PCIe would stop it at {r.pcie_ceiling_mpps:.0f} Mpps "
                 f"({rx_why if name == 'RX' else tx_why})")
        if r.pcie_ceiling_mpps < r.line_mpps:
            text += f", below the {r.line_mpps:.1f} Mpps line rate"
        text += "."
        free = r.free_guest
        if free is not None:
            text += (f"  With a guest that costs nothing: {free.mpps:.1f} Mpps, {free.binds} "
                     f"binds")
            if free.binds == "pcie":
                text += f" ({max(free.pcie_up, free.pcie_down):.0%} busy)"
            text += "."
        parts.append(text)
    if all(r.binds != "wire" and r.pcie_ceiling_mpps < r.line_mpps for r in (rx, tx)):
        parts.append(f"So {label} B traffic is guest-bound here, and with a faster guest it "
                     f"would be PCIe-bound, never wire-bound.")
    return "  ".join(parts)


def default_link():
    from sim.config import IfcvfConfig
    from sim.pcie_link import PcieLink
    from sim.world import World
    cfg = IfcvfConfig()
    return PcieLink(World(0), gen=cfg.pcie_gen, lanes=cfg.pcie_lanes, mps=cfg.pcie_mps,
                    mrrs=cfg.pcie_mrrs, rcb=cfg.pcie_rcb,
                    completions_at_rcb=cfg.pcie_completions_at_rcb)
