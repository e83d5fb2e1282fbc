"""What a simulated VF's model counted, as the driver's ``DeviceCounters``.

The IFCVF has no counter registers; on `sim` the model's datapath counts what
the device did (descriptor chains, frames, bytes, drops by reason, bad
descriptors, dirty-log marks), and the composition layer hands that to
``VdpaDevice.stats(device=...)``.  The driver never imports the model.
"""
from __future__ import annotations

from ifcvf.stats import DeviceCounters, DeviceQueueCounters


def device_counters(model) -> DeviceCounters:
    """A ``DeviceCounters`` from ``model`` (a ``sim.ifcvf.IfcvfFunction``)."""
    stats = model.datapath.stats()
    queues = {}
    for q, c in stats["queues"].items():
        queues[q] = DeviceQueueCounters(
            chains=c["chains"], frames=c["frames"], bytes=c["bytes"], dropped=c["dropped"],
            bad_descriptors=c["runts"] + c["oversize"] if c["kind"] == "tx" else 0,
            drops=dict(c["drops"]),
            kicks=c["kicks"], interrupts=c["interrupts"], last_avail=c["last_avail"],
            last_used=c["last_used"], broken=c["broken"])
    port = stats["port"]
    return DeviceCounters(queues=queues, port_tx_frames=port["tx_frames"], port_tx_bytes=port["tx_bytes"],
                          port_rx_frames=port["rx_frames"], port_rx_bytes=port["rx_bytes"],
                          rx_no_queue=stats["rx_no_queue"], log_marks=stats["log"]["marks"])
