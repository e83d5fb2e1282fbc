"""`ifcvf serve --metrics HOST:PORT`: Prometheus metrics at /metrics (prometheus_client).

Every scrape takes one snapshot per VF (``Daemon.stats``) on the event
loop's own thread: the HTTP thread hands the work to the loop
(``VhostServer.call_soon``) and waits for it, at most SNAPSHOT_TIMEOUT_S, so a
scrape never reads the driver while the loop changes it.  Names and labels
follow Prometheus conventions: ``ifcvf_`` prefix, base units (seconds,
bytes), counters end in ``_total``, states as one 0/1 sample per value.
Labels: ``vf`` (the vhost-user socket path), ``queue`` (vring index),
``direction`` (rx for even vrings, tx for odd), and on dropped frames
``reason`` (one sample per reason the device counts, zeros included, so a
drop of a new kind is a rate, not a new series; the queue's total is
``sum without (reason)``: no separate total sample that a sum over the
label would count twice).
"""
from __future__ import annotations

import logging
import threading

from ifcvf.stats import PHASES, VfStats

log = logging.getLogger("ifcvf.metrics")

SNAPSHOT_TIMEOUT_S = 5.0
STATES = ("stopped", "direct", "hw-logging", "sw-relay", "paused")
MODES = ("hw-logging", "sw-relay")

# (metric name without _total, RelayCounters field, help)
DRIVER_QUEUE_COUNTERS = (
    ("ifcvf_queue_kicks_relayed", "kicks", "Guest kicks the driver wrote to the VF's doorbell"),
    ("ifcvf_queue_interrupts_relayed", "interrupts", "VF interrupts the software relay took"),
    ("ifcvf_queue_relay_entries", "relayed", "Used entries the software relay copied to the guest"),
    ("ifcvf_queue_relay_signals", "signals", "Guest interrupts (call eventfd writes) by the software relay"),
    ("ifcvf_queue_relay_polls", "polls", "Relays made by the software relay's polls, without an interrupt"),
    ("ifcvf_queue_relay_kicks", "relay_kicks", "Doorbells the software relay rang for the guest"),
    ("ifcvf_queue_relay_pages_logged", "pages_logged", "Buffer pages the software relay marked in the dirty log"),
)
# (metric name without _total, DeviceQueueCounters field, help)
DEVICE_QUEUE_COUNTERS = (
    ("ifcvf_queue_descriptors", "chains", "Descriptor chains the device completed"),
    ("ifcvf_queue_frames", "frames", "Frames the device moved"),
    ("ifcvf_queue_bytes", "bytes", "Bytes the device moved"),
    ("ifcvf_queue_bad_descriptors", "bad_descriptors", "TX chains the device refused (runts, oversize)"),
    ("ifcvf_queue_device_kicks", "kicks", "Doorbell writes the device took"),
    ("ifcvf_queue_device_interrupts", "interrupts", "Interrupts the device raised"),
)


class SnapshotTimeout(Exception):
    pass


class DaemonCollector:
    """A prometheus_client collector over a ``Daemon``."""

    def __init__(self, daemon):
        self.daemon = daemon

    def snapshot(self) -> list[tuple[dict, VfStats]]:
        done = threading.Event()
        out: list = []

        def take() -> None:
            try:
                out.extend((self.daemon.describe(vf), self.daemon.stats(vf)) for vf in self.daemon.vfs.values())
            finally:
                done.set()

        self.daemon.server.call_soon(take)
        if not done.wait(SNAPSHOT_TIMEOUT_S):
            raise SnapshotTimeout(f"the event loop did not answer within {SNAPSHOT_TIMEOUT_S} s")
        return out

    def describe(self):
        return []   # no samples at registration time: the VFs come and go

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("ifcvf_up", "1 when the event loop answered this scrape")
        try:
            snaps = self.snapshot()
        except SnapshotTimeout as err:
            log.error("metrics: %s", err)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        def gauge(name, doc, labels):
            return GaugeMetricFamily(name, doc, labels=labels)

        def counter(name, doc, labels):
            return CounterMetricFamily(name, doc, labels=labels)

        info = gauge("ifcvf_vf_info", "One sample per VF served", ["vf", "device", "kind", "devargs"])
        connected = gauge("ifcvf_vf_connected", "1 while a vhost-user front-end is connected", ["vf"])
        state = gauge("ifcvf_vf_state", "The VF's datapath state (1 for the current one)", ["vf", "state"])
        pairs = gauge("ifcvf_vf_queue_pairs", "Queue pairs the VF has", ["vf"])
        mode = gauge("ifcvf_migration_mode", "How the VF migrates (1 for its mode)", ["vf", "mode"])
        phase = gauge("ifcvf_migration_phase", "The VF's migration phase (1 for the current one)",
                      ["vf", "phase"])
        migrations = counter("ifcvf_migrations", "Migrations started (LOG_ALL set while running)", ["vf"])
        switch_overs = counter("ifcvf_migration_switch_overs", "Stops with LOG_ALL set (switch-overs)", ["vf"])
        pauses = counter("ifcvf_migration_pauses", "Stops for want of a usable dirty log", ["vf"])
        precopy = gauge("ifcvf_migration_last_precopy_seconds",
                        "Last migration: LOG_ALL set to the switch-over stop", ["vf"])
        downtime = gauge("ifcvf_migration_last_downtime_seconds",
                         "Last migration: how long the VF's rings stood still, as this back-end saw it", ["vf"])
        marks = counter("ifcvf_dirty_log_marks", "Dirty-log marks (driver: used rings at stops; "
                        "device: pages the VF marked)", ["vf", "source"])
        qlabels = ["vf", "queue", "direction"]
        running = gauge("ifcvf_queue_running", "1 while the queue runs", qlabels)
        broken = gauge("ifcvf_queue_broken", "1 when the software relay stopped serving the queue", qlabels)
        driver_q = [(counter(n, doc, qlabels), f) for n, f, doc in DRIVER_QUEUE_COUNTERS]
        device_q = [(counter(n, doc, qlabels), f) for n, f, doc in DEVICE_QUEUE_COUNTERS]
        dropped = counter("ifcvf_queue_dropped_frames", "Frames the device dropped, by reason",
                          qlabels + ["reason"])
        port_frames = counter("ifcvf_port_frames", "Frames through the VF's port", ["vf", "direction"])
        port_bytes = counter("ifcvf_port_bytes", "Bytes through the VF's port", ["vf", "direction"])
        no_queue = counter("ifcvf_port_rx_no_queue_frames",
                           "Received frames for a queue pair the guest has not enabled", ["vf"])

        for desc, s in snaps:
            vf = desc["socket"]
            info.add_metric([vf, desc["device"], desc["kind"], desc["devargs"]], 1)
            connected.add_metric([vf], int(desc["connected"]))
            pairs.add_metric([vf], s.queue_pairs)
            for value in STATES:
                state.add_metric([vf, value], int(s.state == value))
            m = s.migration
            for value in MODES:
                mode.add_metric([vf, value], int(m.mode == value))
            for value in PHASES:
                phase.add_metric([vf, value], int(m.phase == value))
            migrations.add_metric([vf], m.migrations)
            switch_overs.add_metric([vf], m.switch_overs)
            pauses.add_metric([vf], m.pauses)
            if m.last_precopy_s is not None:
                precopy.add_metric([vf], m.last_precopy_s)
            if m.last_downtime_s is not None:
                downtime.add_metric([vf], m.last_downtime_s)
            marks.add_metric([vf, "driver"], m.log_marks)
            if s.device is not None:
                marks.add_metric([vf, "device"], s.device.log_marks)
                port_frames.add_metric([vf, "tx"], s.device.port_tx_frames)
                port_frames.add_metric([vf, "rx"], s.device.port_rx_frames)
                port_bytes.add_metric([vf, "tx"], s.device.port_tx_bytes)
                port_bytes.add_metric([vf, "rx"], s.device.port_rx_bytes)
                no_queue.add_metric([vf], s.device.rx_no_queue)
            for q in s.queues:
                labels = [vf, str(q.index), q.direction]
                running.add_metric(labels, int(q.running))
                broken.add_metric(labels, int(q.broken is not None))
                for family, field in driver_q:
                    family.add_metric(labels, getattr(q.driver, field))
                if q.device is not None:
                    for family, field in device_q:
                        family.add_metric(labels, getattr(q.device, field))
                    for reason, count in sorted(q.device.drops.items()):
                        dropped.add_metric(labels + [reason], count)
        yield from (info, connected, state, pairs, mode, phase, migrations, switch_overs, pauses,
                    precopy, downtime, marks, running, broken)
        yield from (f for f, _ in driver_q)
        yield from (f for f, _ in device_q)
        yield dropped
        yield from (port_frames, port_bytes, no_queue)


class MetricsServer:
    """The HTTP endpoint, on a thread of prometheus_client's."""

    def __init__(self, daemon, host: str, port: int):
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon))
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.host = host
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
