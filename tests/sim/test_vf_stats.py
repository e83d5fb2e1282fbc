"""Per-VF and per-queue statistics (issue 14): the driver's own counters, the model's on
`sim`, and the migration mode and phase, through the one snapshot API
(``VdpaDevice.stats``)."""
import json

import pytest

from hal.memory import HostMemory
from ifcvf.stats import VfStats
from ifcvf.tools.modelstats import device_counters
from ifcvf.tools.runs.stack import SimHost, Vm, cable
from ifcvf.vhost.protocol import log_size
from sim.config import IfcvfConfig
from sim.traffic import Generator, Sink, steer_by_flow

US = 1_000
PAGE = 4096


class Stack:
    def __init__(self, devargs: str):
        self.host = SimHost(seed=41)
        self.vf = self.host.add_vf(IfcvfConfig(queue_pairs=2), devargs=devargs)
        self.vm = Vm(self.host, pairs=2, queue_size=256, tx_rate_gbps=5, tx_sizes=1518, tx_flows=2,
                     rx_flows=8)
        self.fe = self.vm.plug(self.vf)
        tester = cable(self.host.world, self.vf)
        self.vf.model.datapath.steer = steer_by_flow([0, 1])
        self.sink = Sink(self.host.world, tester, flows=4, flow_base=self.vm.guest.tx_flow_base)
        self.gen = Generator(self.host.world, tester, 1518, rate_gbps=10, burst=8, flows=8, flow_run=8)
        self.log = HostMemory(4 * PAGE, "vhost-log")

    def run(self, us: float) -> None:
        self.host.world.advance_ns(int(us * US))

    def stats(self) -> VfStats:
        return self.vf.driver.stats(device_counters(self.vf.model))

    def close(self) -> None:
        self.host.close()
        self.log.close()


@pytest.fixture(params=["vdpa=1", "vdpa=1,sw-live-migration=1"], ids=["hw", "sw"])
def stack(request):
    s = Stack(request.param)
    yield s
    s.close()


def test_snapshot_has_every_queue_with_driver_and_device_counters(stack):
    stack.vm.guest.start()
    stack.gen.start()
    stack.run(300)
    snap = stack.stats()
    assert snap.state == "direct" and snap.queue_pairs == 2 and snap.features
    assert [q.index for q in snap.queues] == [0, 1, 2, 3]
    assert [q.direction for q in snap.queues] == ["rx", "tx", "rx", "tx"]
    model = stack.vf.model.datapath.stats()
    for q in snap.queues:
        assert q.running
        # The device's own counts are the model's, queue by queue.
        assert q.device.frames == model["queues"][q.index]["frames"]
        assert q.device.chains == model["queues"][q.index]["chains"]
    # The guest kicked its TX queues and the driver relayed those kicks to the doorbells.
    assert sum(q.driver.kicks for q in snap.queues if q.direction == "tx") > 0
    assert sum(q.device.frames for q in snap.queues if q.direction == "rx") > 0
    assert snap.device.port_rx_frames > 0 and snap.device.port_tx_frames > 0
    assert snap.migration.phase == "none" and snap.migration.migrations == 0
    # JSON-able as it is (the control socket sends it).
    assert json.loads(json.dumps(snap.to_dict()))["queues"][0]["direction"] == "rx"


def test_counters_grow_across_a_migration_and_phases_follow_it(stack):
    sw = stack.vf.driver.devargs.sw_live_migration
    stack.vm.guest.start()
    stack.gen.start()
    stack.run(200)
    before = stack.stats()
    stack.fe.set_log_base(stack.log.fd, log_size(stack.vm.ram.size))
    stack.fe.set_log_all(True, stack.vm.rings)
    stack.run(400)
    during = stack.stats()
    assert during.migration.phase == "logging" and during.migration.migrations == 1
    assert during.migration.mode == ("sw-relay" if sw else "hw-logging")
    assert during.state == ("sw-relay" if sw else "hw-logging")
    if sw:
        rx = [q for q in during.queues if q.direction == "rx"]
        assert all(q.relayed_by_sw for q in rx)
        assert sum(q.driver.relayed for q in rx) > 0
        assert sum(q.driver.pages_logged for q in rx) > 0
        assert sum(q.driver.interrupts + q.driver.polls for q in rx) > 0
    else:
        assert during.device.log_marks > before.device.log_marks
    stack.gen.stop()
    stack.vm.guest.pause()
    stack.fe.stop(stack.vm.rings)
    after = stack.stats()
    assert after.state == "stopped"
    m = after.migration
    assert m.phase == "switched-over" and m.switch_overs == 1
    assert m.log_marks == 4          # every used ring, at the stop
    # Simulated time: LOG_ALL was on for the 400 us advanced, plus the control path's own MMIO.
    assert 400e-6 <= m.last_precopy_s < 2e-3
    assert m.last_downtime_s is None  # the guest goes on elsewhere: not known here
    # Counters never go back, even though the relays that counted are gone.
    for b, a in zip(during.queues, after.queues):
        for name in ("kicks", "interrupts", "relayed", "signals", "polls", "pages_logged"):
            assert getattr(a.driver, name) >= getattr(b.driver, name), (a.index, name)
        assert not a.running


def test_cancelled_migration_and_a_pause_for_want_of_a_log(stack):
    stack.vm.guest.start()
    stack.gen.start()
    stack.run(100)
    # LOG_ALL with no usable log: the VF stops (never fails towards QEMU), then a log comes.
    stack.fe.set_log_all(True, stack.vm.rings)
    paused = stack.stats()
    assert paused.state == "paused" and paused.migration.phase == "paused"
    assert paused.migration.pauses == 1
    stack.run(250)
    stack.fe.set_log_base(stack.log.fd, log_size(stack.vm.ram.size))
    resumed = stack.stats().migration
    assert resumed.phase == "logging"
    assert 250e-6 <= resumed.last_downtime_s < 2e-3   # the rings stood still while paused
    stack.run(100)
    stack.fe.set_log_all(False, stack.vm.rings)
    cancelled = stack.stats()
    assert cancelled.migration.phase == "cancelled" and cancelled.state == "direct"
    assert cancelled.migration.switch_overs == 0


class _Loop:
    """The part of VhostServer the collector uses: work handed to the loop runs at once."""

    def call_soon(self, fn):
        fn()


class _OneVf:
    def __init__(self, stack):
        self.stack = stack
        self.server = _Loop()
        self.vfs = {"/run/vf0.sock": object()}

    def describe(self, vf):
        return {"socket": "/run/vf0.sock", "device": "sim", "kind": "IFCVF", "devargs": "vdpa=1",
                "connected": True}

    def stats(self, vf):
        return self.stack.stats()


def scrape(stack) -> str:
    prometheus_client = pytest.importorskip("prometheus_client")
    from ifcvf.tools.metrics import DaemonCollector

    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(_OneVf(stack)))
    return prometheus_client.generate_latest(registry).decode()


def sample(body: str, name: str, **labels) -> float:
    import re

    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", body, re.M)
    assert m, f"no {name}{{{want}}} in:\n{body}"
    return float(m.group(1))


def test_metrics_show_traffic_migration_phase_and_downtime(stack):
    vf = "/run/vf0.sock"
    stack.vm.guest.start()
    stack.gen.start()
    stack.run(200)
    body = scrape(stack)
    snap = stack.stats()
    assert sample(body, "ifcvf_queue_frames_total", vf=vf, queue=0, direction="rx") == snap.queues[0].device.frames > 0
    assert sample(body, "ifcvf_queue_kicks_relayed_total", vf=vf, queue=1, direction="tx") == snap.queues[1].driver.kicks
    assert sample(body, "ifcvf_port_frames_total", vf=vf, direction="rx") > 0
    assert sample(body, "ifcvf_migration_phase", vf=vf, phase="none") == 1
    # LOG_ALL with no log: paused; then the log comes: the pause is the downtime.
    stack.fe.set_log_all(True, stack.vm.rings)
    assert sample(scrape(stack), "ifcvf_migration_phase", vf=vf, phase="paused") == 1
    stack.run(300)
    stack.fe.set_log_base(stack.log.fd, log_size(stack.vm.ram.size))
    stack.run(100)
    body = scrape(stack)
    assert sample(body, "ifcvf_migration_phase", vf=vf, phase="logging") == 1
    assert sample(body, "ifcvf_migration_phase", vf=vf, phase="paused") == 0
    assert sample(body, "ifcvf_migrations_total", vf=vf) == 1
    assert sample(body, "ifcvf_migration_pauses_total", vf=vf) == 1
    assert sample(body, "ifcvf_migration_last_downtime_seconds", vf=vf) == stack.stats().migration.last_downtime_s
    assert 300e-6 <= stack.stats().migration.last_downtime_s < 2e-3
    stack.gen.stop()
    stack.vm.guest.pause()
    stack.fe.stop(stack.vm.rings)
    body = scrape(stack)
    assert sample(body, "ifcvf_migration_phase", vf=vf, phase="switched-over") == 1
    assert sample(body, "ifcvf_migration_switch_overs_total", vf=vf) == 1
    assert sample(body, "ifcvf_migration_last_precopy_seconds", vf=vf) >= 400e-6
    assert sample(body, "ifcvf_dirty_log_marks_total", vf=vf, source="driver") == 4
    assert sample(body, "ifcvf_vf_state", vf=vf, state="stopped") == 1


def test_drops_by_reason_reach_the_snapshot_ctl_and_metrics():
    """A guest that stops taking frames: the RX FIFO fills (fifo_full); the front-end stops
    the VF with frames waiting (flushed_at_stop); frames keep coming (not_running).  Each
    reason shows in VfStats, in `ifcvf ctl stats` (JSON and text) and in the metrics."""
    from ifcvf.tools.commands.ctl import render

    stack = Stack("vdpa=1")
    try:
        stack.vm.guest.start()
        stack.gen.start()
        stack.run(100)
        assert all(not q.device.dropped for q in stack.stats().queues)
        stack.vm.guest.pause()
        stack.run(3000)
        stack.fe.stop(stack.vm.rings)
        stack.run(200)
        snap = stack.stats()
        rx0 = snap.queues[0].device
        assert set(rx0.drops) == {"fifo_full", "not_running", "flushed_at_stop", "too_big", "oversize"}
        assert rx0.drops["fifo_full"] > 0 and rx0.drops["flushed_at_stop"] > 0
        assert rx0.drops["not_running"] > 0 and rx0.drops["too_big"] == rx0.drops["oversize"] == 0
        assert sum(rx0.drops.values()) == rx0.dropped
        assert snap.queues[1].device.drops == {"runt": 0, "oversize": 0}
        # `ifcvf ctl stats --json` sends to_dict(); the text form lists the reasons seen.
        sent = json.loads(json.dumps({"socket": "/run/vf0.sock", **snap.to_dict()}))
        assert sent["queues"][0]["device"]["drops"] == rx0.drops
        text = render("stats", [sent])
        assert (f"drops: fifo_full {rx0.drops['fifo_full']}, flushed_at_stop "
                f"{rx0.drops['flushed_at_stop']}, not_running {rx0.drops['not_running']}") in text
        assert "too_big" not in text
        body = scrape(stack)
        for reason, count in rx0.drops.items():
            assert sample(body, "ifcvf_queue_dropped_frames_total", vf="/run/vf0.sock", queue=0,
                          direction="rx", reason=reason) == count
        assert sample(body, "ifcvf_queue_dropped_frames_total", vf="/run/vf0.sock", queue=1,
                      direction="tx", reason="runt") == 0
    finally:
        stack.close()
