"""Traffic and live-migration scenarios on simulated VFs, with invariants that can fail.

One world holds a source VF and a destination VF, each behind its own
vhost-user back-end, a guest (``sim.guest.GuestNet``) in source RAM, and a
tester port with a traffic generator and a sink.  The tester and both VFs'
ports hang on an L2 switch with MAC learning (``sim.switch``).  The QEMU role
(``sim.migration.PreCopy``) migrates the guest; at switch-over the guest
continues in destination RAM on the destination VF, and the network learns
that only from the guest's frames: the destination's QEMU role raises the
config interrupt with VIRTIO_NET_S_ANNOUNCE when the guest acked
GUEST_ANNOUNCE (``sim.announce``), the guest sends gratuitous ARPs and the
switch moves its MAC; without GUEST_ANNOUNCE only the guest's own traffic
moves it.  Until then the switch sends the guest's frames to the old port,
where the source VF drops them: the RX blackout, reported under
``network``.  Checked on every run:

1. memory: at switch-over, destination RAM equals source RAM page by page;
2. frames: every frame the guest sent left on a wire exactly once, and every
   frame offered to the guest was delivered exactly once and in order, except
   frames a VF dropped itself before any DMA (counted by the VF, with the
   reason); anything else is reported as lost or duplicated, with the
   descriptors that were in flight at switch-over;
3. exclusion: no queue of the source ran while one of the destination did;
4. liveness: while an RX queue runs, frames are offered to it and the guest
   has buffers posted on it, deliveries to the guest never stop for longer
   than ``[expect] max_rx_gap_us`` (default: the larger of 2 ms and 4 mean
   gaps between arrivals at one RX queue; 2 ms is twice the longest period
   anything on the path may wait by design, the relay's 1 ms safety poll).
   A stall is reported with the queue, the time window and the ring indexes
   (guest avail idx, used idx, used_event, avail_event; the VF's last_avail
   and last_used).  Checked every eighth of the bound, so a window is exact
   to that.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from hal.memory import HostMemory, align_up
from ifcvf.devargs import parse as parse_devargs
from ifcvf.tools.runs.stack import SimHost, Vf, Vm
from ifcvf.vhost.protocol import log_size
from sim._native import lib
from sim.migration import (CpuDirtyTracker, Outcome, PreCopy, PreCopyConfig,
                           regions_of)
from sim.ramstream import fill_used
from sim.scenario import Scenario, device_config
from sim import virtio_regs as vr
from sim.announce import AnnounceParams, VirtioNetAnnounce, announce_self
from sim.frames import FrameBatch
from sim.guest import SUPPORTED_FEATURES, GuestCosts
from sim.switch import Switch, mac_text
from sim.traffic import (DEFAULT_DST_MAC, DEFAULT_SRC_MAC, Arrivals, Generator, Responder, Sink,
                         steer_by_flow)
from sim.wire import Port

PAGE = 4096
SAMPLE_US = 20.0
LOW_RATE_SAMPLE_US = 1000.0    # *_pps traffic: runs last long, frames are few
MIN_RX_GAP_US = 2000.0         # the default liveness bound's floor (see the module doc)
GAP_MEANS = 4                  # ... or this many mean gaps between arrivals at one RX queue


@dataclass
class Sample:
    t_us: float
    rx_bytes: int
    tx_bytes: int
    rx_frames: int = 0
    tx_frames: int = 0


@dataclass
class Leg:
    """One migration: from VF ``src`` to VF ``dst``."""

    src: str
    dst: str
    outcome: Outcome
    start_us: float
    in_flight: dict[int, tuple[int, int]] = field(default_factory=dict)  # q -> (base, avail idx)
    skipped_pages: list[int] = field(default_factory=list)
    blackout: dict = field(default_factory=dict)


class MigrationRun:
    def __init__(self, scenario: Scenario, progress=None):
        self.scenario = scenario
        self.progress = progress or (lambda phase, info: None)
        drv = scenario.section("driver")
        self.traffic = scenario.section("traffic")
        self.mig = scenario.section("migration")
        self.pairs = drv["queue_pairs"]
        self.devargs = parse_devargs(drv["devargs"])
        self.host = SimHost(seed=scenario.seed)
        config = device_config(scenario.device)
        if config.queue_pairs < self.pairs:
            config = config.replace(queue_pairs=self.pairs)
        self.vfs = [self.host.add_vf(config, drv["devargs"])]
        if scenario.kind == "migration":
            self.vfs.append(self.host.add_vf(config, drv["devargs"]))
        world = self.host.world
        t = self.traffic
        flows = t["flows_per_pair"]
        rx_flows = flows * self.pairs
        pattern = dict(pattern=t["pattern"], burst=t["burst"], on_us=t["on_us"], off_us=t["off_us"])
        self.vm = Vm(self.host, pairs=self.pairs, queue_size=drv["queue_size"],
                     ram_mib=drv["guest_memory_mib"], tx_rate_gbps=t["tx_gbps"],
                     tx_sizes=t["frame_size"], tx_flows=flows, rx_flows=2 * rx_flows,
                     interrupts=drv["interrupts"], napi_budget=drv["napi_budget"],
                     costs=GuestCosts().scaled(drv["guest_cost_scale"]),
                     rx_alloc_fail=drv["rx_alloc_fail"], tx_pps=t["tx_pps"],
                     tx_pattern=pattern["pattern"], tx_burst=pattern["burst"],
                     tx_on_us=pattern["on_us"], tx_off_us=pattern["off_us"],
                     link_up_announce=True)
        if scenario.kind == "migration":
            self._fill_used_ram(drv["guest_used_fraction"], scenario.seed)
        self.style, self.status = drv["front_end"], drv["status"]
        wanted = SUPPORTED_FEATURES
        if not drv["event_idx"]:
            wanted &= ~(1 << vr.F_EVENT_IDX)
        if not drv["guest_announce"]:
            wanted &= ~(1 << vr.F_NET_GUEST_ANNOUNCE)
        self.fe = self.vm.plug(self.vfs[0], style=self.style, status=self.status, wanted=wanted)
        net = scenario.section("network")
        self.announce_params = AnnounceParams(net["announce_initial_ms"], net["announce_max_ms"],
                                              net["announce_rounds"], net["announce_step_ms"])
        # QEMU's side of config space and control queue, on the source: link up, no rounds
        self.announcer = self._announcer(self.vm.features)
        self.announcers: list[VirtioNetAnnounce] = [self.announcer]
        self.self_announce: list = []
        self.current = self.vfs[0]
        self.active = list(range(self.pairs))
        # RX offered per pair, and when the first frame since the last delivery came
        # to a running queue (frames a stopped queue drops are owed to nobody)
        self.offered = [0] * self.pairs
        self.first_owed: list[int | None] = [None] * self.pairs
        steer = steer_by_flow(self.active)

        def counting_steer_for(vf):
            def counting_steer(batch) -> int:
                pair = steer(batch)
                # frames reaching a VF the guest is not on are owed to nobody
                if 0 <= pair < self.pairs and vf is self.current:
                    self.offered[pair] += len(batch.lengths)
                    if (self.first_owed[pair] is None
                            and self.current.model.queues[2 * pair].running):
                        self.first_owed[pair] = world.now
                return pair
            return counting_steer
        for vf in self.vfs:
            vf.model.datapath.steer = counting_steer_for(vf)
        # The network: the tester and every VF's port on one switch
        self.switch = Switch(world, latency_ns=net["switch_latency_ns"], aging_s=net["aging_s"])
        self.tester = Port(world, "tester", self.current.model.config.wire_gbps)
        self.switch.attach(self.tester, name="tester")
        self.vf_ports = {vf.model.name: self.switch.attach(vf.model.port, name=vf.model.name)
                         for vf in self.vfs}
        self.guest_mac = self.vm.guest.mac
        self.to_guest = self.switch.watch(self.guest_mac)
        self.tester_mac = DEFAULT_SRC_MAC
        self.sink = Sink(world, None, flows=flows * self.pairs, flow_base=self.vm.guest.tx_flow_base)
        self.tester_other = 0          # frames the tester got not addressed to it (broadcasts)
        self.tester.on_receive(self._tester_receive)
        self.gen = None
        size = t["frame_size"]
        if t["rx_gbps"] > 0:
            burst = max(32, min(512, 32768 // size))
            self.gen = Generator(world, self.tester, size, rate_gbps=t["rx_gbps"],
                                 burst=burst, flows=rx_flows, flow_run=burst)
        self._rx_pattern = pattern
        # Replies (ping-like): flows rx_flows .. 2 * rx_flows - 1 of the guest's checker
        self.responder = None
        if t["reply"]:
            self.responder = Responder(world, self.tester, size, delay_us=t["reply_delay_us"],
                                       flows=rx_flows, flow_base=rx_flows)
            self.sink.on_frames.append(self.responder.answer)
        self.rx_gap_bound_us = self._rx_gap_bound()
        self.stalls: list[dict] = []
        self.samples: list[Sample] = []
        self.legs: list[Leg] = []
        self.leaked: list[str] = []

    def _announcer(self, features: int) -> VirtioNetAnnounce:
        guest = self.vm.guest
        a = VirtioNetAnnounce(self.host.world, features, guest.config_interrupt,
                              params=self.announce_params, name=f"qemu-announce-{len(getattr(self, 'announcers', []))}")
        guest.attach_control(a.read_status, a.handle_ack)
        return a

    def _tester_receive(self, batch: FrameBatch) -> None:
        """The tester's host: frames for its MAC to the checking sink, the rest
        (the guest's broadcasts, flooded) counted."""
        ends = self.switch._runs(batch)
        if len(ends) == 1 and bytes(batch.data[:6]) == self.tester_mac:
            self.sink.receive(batch)
            return
        start = off = 0
        data, lengths, times = batch.data, batch.lengths, batch.times
        for end in list(ends):
            size = sum(lengths[start:end])
            if bytes(data[off:off + 6]) == self.tester_mac:
                self.sink.receive(FrameBatch(memoryview(data)[off:off + size], lengths[start:end],
                                             times[start:end]))
            else:
                self.tester_other += end - start
            start, off = end, off + size

    # --- traffic accounting ------------------------------------------------------
    def _start_sampling(self) -> None:
        """A sample of the RX/TX totals every SAMPLE_US for the whole run.

        A chain of callbacks, each scheduled where a sampling process would
        resume (its first step urgent, then one timeout per sample): a 1 GiB
        migration takes ~40k samples, a generator resumed for each otherwise."""
        world = self.host.world
        low_rate = self.traffic["rx_pps"] or self.traffic["tx_pps"]
        step = world.cycles((LOW_RATE_SAMPLE_US if low_rate else SAMPLE_US) * 1000)

        def sample(_ev) -> None:
            rx_frames, rx_bytes = self.vm.guest.rx_totals()
            tx_frames, tx_bytes = self.sink.totals()
            self.samples.append(Sample(world.now_ns() / 1000, rx_bytes, tx_bytes, rx_frames,
                                       tx_frames))
            world.call_at(world.now + step, sample)
        world.call_first(sample)

    def _rate(self, t0_us: float, t1_us: float) -> dict:
        pts = [s for s in self.samples if t0_us <= s.t_us <= t1_us]
        if len(pts) < 2 or pts[-1].t_us <= pts[0].t_us:
            return {"rx_gbps": 0.0, "tx_gbps": 0.0, "rx_pps": 0.0, "tx_pps": 0.0}
        dt = (pts[-1].t_us - pts[0].t_us) * 1e-6
        return {"rx_gbps": round((pts[-1].rx_bytes - pts[0].rx_bytes) * 8 / dt / 1e9, 3),
                "tx_gbps": round((pts[-1].tx_bytes - pts[0].tx_bytes) * 8 / dt / 1e9, 3),
                "rx_pps": round((pts[-1].rx_frames - pts[0].rx_frames) / dt, 1),
                "tx_pps": round((pts[-1].tx_frames - pts[0].tx_frames) / dt, 1)}

    # --- liveness ------------------------------------------------------------------
    def _rx_gap_bound(self) -> float:
        """[expect] max_rx_gap_us, or max(2 ms, 4 mean gaps between arrivals at one RX queue)."""
        stated = self.scenario.section("expect")["max_rx_gap_us"]
        if stated:
            return stated
        t = self.traffic
        wire = t["frame_size"] + 20          # preamble, IFG
        per_queue = 0.0                      # arrivals per second at one RX queue
        if t["rx_gbps"]:
            per_queue += t["rx_gbps"] * 1e9 / 8 / wire / self.pairs
        if t["rx_pps"]:
            per_queue += t["rx_pps"] / t["burst"] / self.pairs
        if t["reply"]:
            sent = t["tx_pps"] / t["burst"] if t["tx_pps"] else t["tx_gbps"] * 1e9 / 8 / wire
            per_queue += sent / self.pairs
        if not per_queue:
            return MIN_RX_GAP_US
        return max(MIN_RX_GAP_US, GAP_MEANS * 1e6 / per_queue)

    def _ring_indexes(self, pair: int) -> dict:
        """Guest ring indexes from guest RAM, the VF's from its model (read only)."""
        guest = self.vm.guest
        lay = guest.layout[2 * pair]
        view = guest.memory.view

        def u16(gpa):
            return int.from_bytes(view[gpa:gpa + 2], "little")
        q = guest.queues[2 * pair]
        out = {"avail_idx": u16(lay.avail + 2), "used_idx": u16(lay.used + 2),
               "used_event": u16(lay.avail + 4 + 2 * lay.size),
               "avail_event": u16(lay.used + 4 + 8 * lay.size),
               "avail_flags": u16(lay.avail), "used_flags": u16(lay.used),
               "guest_in_flight": lib.ifc_gvq_in_flight(q.c)}
        vfq = self.current.model.datapath.stats()["queues"].get(2 * pair, {})
        out.update(vf=self.current.model.name, vf_last_avail=vfq.get("last_avail"),
                   vf_last_used=vfq.get("last_used"), vf_starvations=vfq.get("starvations"),
                   vf_fifo_drops=vfq.get("fifo_drops"))
        return out

    def _liveness(self):
        """The liveness check (module doc, 4), a simpy process until the traffic stops."""
        world = self.host.world
        guest = self.vm.guest
        bound = world.cycles(self.rx_gap_bound_us * 1000)
        step = max(world.cycles(10_000), bound // 8)
        delivered = [0] * self.pairs
        runnable_since: list[int | None] = [None] * self.pairs
        open_ = self._open_stalls = [None] * self.pairs
        while self._live:
            yield world.timeout(step)
            if not self._live:
                return
            now = world.now
            for p in range(self.pairs):
                rx = guest.pairs[p].rx
                got = rx.stats.frames
                if got != delivered[p]:
                    delivered[p] = got
                    self.first_owed[p] = None
                    if open_[p] is not None:
                        self._close_stall(open_[p], now)
                        open_[p] = None
                    continue
                running = self.current.model.queues[2 * p].running
                runnable = (running and not guest.paused and not rx.broken
                            and lib.ifc_gvq_in_flight(rx.c) > 0)
                if not runnable:
                    # what was owed was delivered, or dropped (and counted) by the stop
                    runnable_since[p] = None
                    self.first_owed[p] = None
                    continue
                if runnable_since[p] is None:
                    runnable_since[p] = now
                owed = self.first_owed[p]
                if open_[p] is not None:
                    open_[p]["indexes_last"] = self._ring_indexes(p)
                    open_[p]["last_us"] = round(world.ns(now) / 1000, 3)
                    continue
                if owed is None:
                    continue
                start = max(owed, runnable_since[p])
                if now - start > bound:
                    open_[p] = {"queue": 2 * p, "from_us": round(world.ns(start) / 1000, 3),
                                "to_us": None, "gap_us": None,
                                "detected_us": round(world.ns(now) / 1000, 3),
                                "delivered_before": got, "offered_before": self.offered[p],
                                "indexes": self._ring_indexes(p)}
                    self.stalls.append(open_[p])
                    world.record("liveness", "rx_stall", queue=2 * p, since=start)

    def _end_liveness(self) -> None:
        """Traffic stopped: windows still open end with the run."""
        world = self.host.world
        self._live = False
        for stall in self._open_stalls:
            if stall is not None:
                stall["indexes_at_end"] = self._ring_indexes(stall["queue"] // 2)
                stall["offered_during"] = self.offered[stall["queue"] // 2] - stall["offered_before"]
                stall["gap_us"] = round(world.now_ns() / 1000 - stall["from_us"], 3)

    def _close_stall(self, stall: dict, now: int) -> None:
        world = self.host.world
        stall["to_us"] = round(world.ns(now) / 1000, 3)
        stall["gap_us"] = round(stall["to_us"] - stall["from_us"], 3)
        stall["offered_during"] = self.offered[stall["queue"] // 2] - stall["offered_before"]

    # --- migration ---------------------------------------------------------------
    def _fill_used_ram(self, fraction: float, seed: int) -> None:
        """The RAM the guest used before the run: data after its rings and buffers.
        Never-written pages stay holes in the memfd and cost no memory."""
        first = -(-self.vm.layout_end // PAGE)
        pages = int((self.vm.ram.size // PAGE - first) * fraction)
        fill_used(self.vm.ram, first, pages, seed)

    def _cpu_ranges(self) -> list[tuple[int, int]]:
        """What the guest's CPU writes as it runs: ring metadata, private blocks, TX buffers."""
        ranges = []
        for lay in self.vm.guest.layout:
            ranges.append((lay.desc, lay.used - lay.desc))
            ranges.append((lay.priv, PAGE))
            if lay.is_tx:
                ranges.append((lay.seq or lay.priv, PAGE))
                ranges.append((lay.bufs, lay.nslots * lay.buf_size))
        return ranges

    def _migrate(self, src: Vf, dst: Vf, src_ram, dst_ram) -> Leg:
        world = self.host.world
        log_memory = HostMemory(align_up(max(log_size(src_ram.size), PAGE)), "qemu-vhost-log")
        cpu = CpuDirtyTracker(world, src_ram, always=self._cpu_ranges(),
                              workload_base=self.vm.layout_end,
                              workload_size=min(self.mig["guest_dirty_set_mib"] << 20,
                                                src_ram.size - self.vm.layout_end),
                              rate_bytes_per_s=self.mig["guest_dirty_mib_s"] * (1 << 20),
                              name=f"cpu-{src.model.name}")
        leg = Leg(src.model.name, dst.model.name, None, world.now_ns() / 1000)
        vm, fe_src = self.vm, self.fe

        def pause_guest():
            vm.guest.pause()

        def start_destination(bases):
            for q in range(2 * self.pairs):
                leg.in_flight[q] = (bases[q], vm.guest.ring_indexes(q)[0])
            # No cable moves: both VFs hang on the switch, which learns where
            # the guest is from the frames the destination VF sends.
            self._blackout_start(leg, src, dst)
            self.current = dst
            fe_dst = self.host.connect(dst, style=self.style, status=self.status,
                                       name=f"{vm.name}@{dst.model.name}")
            fe_dst.connect(2 * self.pairs)
            fe_dst.start(fe_src.acked_features & ~(1 << 26), regions_of(dst_ram), vm.rings, bases=bases)
            vm.guest.remap(dst_ram)
            vm.attach(fe_dst)
            self.fe = fe_dst
            # QEMU's virtio-net post_load arms the announce timer; announce_self
            # sends its RARPs to the vhost-user peer (migration_done)
            self.announcer.stop()
            self.announcer = self._announcer(fe_src.acked_features)
            self.announcers.append(self.announcer)
            leg.blackout["announcer"] = self.announcer
            vm.guest.resume()
            vm.guest.kick_all()
            self.announcer.post_load()
            leg.blackout["self_announce"] = announce_self(
                world, fe_dst, self.guest_mac, fe_src.acked_features, params=self.announce_params)
            fe_src.close()   # the source QEMU goes away

        config = PreCopyConfig(bandwidth_bytes_per_s=self.mig["bandwidth_mib_s"] * (1 << 20),
                               downtime_limit_ns=int(self.mig["downtime_limit_ms"] * 1e6),
                               max_iterations=self.mig["max_iterations"],
                               cancel_after=self.mig["cancel_after"])
        precopy = PreCopy(world, source=fe_src, rings=vm.rings, src_ram=src_ram, dst_ram=dst_ram,
                          log_memory=log_memory, cpu=cpu, config=config, pause_guest=pause_guest,
                          start_destination=start_destination,
                          on_progress=lambda phase, info: self.progress(phase, info))
        try:
            leg.outcome = precopy.run()
        finally:
            cpu.paused = True
            precopy.reader.close()
            log_memory.close()
        leg.skipped_pages = list(src.model.datapath.skipped_pages)
        if leg.outcome.cancelled or not leg.outcome.converged:
            self._check_direct_again(src)
        return leg

    # --- the RX blackout ----------------------------------------------------------------
    def _blackout_start(self, leg: Leg, src: Vf, dst: Vf) -> None:
        """Switch-over: count from now what the switch sends where, and when the
        guest gets its first frame at the destination (polled every 10 us)."""
        world = self.host.world
        tag = f"switchover-{len(self.legs)}"
        self.switch.mark(tag)
        t0 = world.now
        old, new = self.vf_ports[src.model.name], self.vf_ports[dst.model.name]
        b = leg.blackout
        b.update(t0=t0, old_port=old, new_port=new, tag=tag, first_at_port=None,
                 first_delivery=None, delivered_before=self.vm.guest.rx_counts().frames,
                 moved=None)

        b["to_old"] = 0

        def listener(mac, port, frames, first_arrival):
            if mac != self.guest_mac:
                return
            if port == old:
                b["to_old"] += frames
            elif port == new and b["first_at_port"] is None:
                b["first_at_port"] = first_arrival
        # the previous leg's count ends here (the guest may come back to its port)
        for prev in self.legs:
            if "_listener" in prev.blackout:
                self.switch.listeners.remove(prev.blackout.pop("_listener"))
        self.switch.listeners.append(listener)
        b["_listener"] = listener
        moves_before = len(self.switch.moves)
        b["_moves_before"] = moves_before

        def watch_delivery():
            # the first delivery counted once a frame reached the destination's
            # port (before that the guest may still take frames the source left)
            step = world.cycles(10_000)
            guest = self.vm.guest
            before = None
            while b["first_delivery"] is None and self._live:
                yield world.timeout(step)
                if b["first_at_port"] is None:
                    continue
                if before is None:
                    before = b["delivered_before"] = guest.rx_totals()[0]
                elif guest.rx_totals()[0] > before:
                    b["first_delivery"] = world.now
        world.process(watch_delivery())

    def _blackout_report(self, leg: Leg) -> dict:
        world = self.host.world
        b = leg.blackout
        if not b:
            return {}
        if "_listener" in b:
            self.switch.listeners.remove(b.pop("_listener"))
        t0 = b["t0"]
        moved = [m for m in self.switch.moves[b.get("_moves_before", 0):]
                 if m.mac == self.guest_mac and m.to_port == b["new_port"]]
        move = moved[0] if moved else None

        def us(cycle):
            return None if cycle is None else round(world.ns(cycle - t0) / 1000, 3)
        return {
            "leg": f"{leg.src}->{leg.dst}",
            "frames_to_old_port": b["to_old"],
            "first_frame_at_destination_us": us(b["first_at_port"]),
            "first_delivery_to_guest_us": us(b["first_delivery"]),
            "mac_moved_us": us(move.cycle) if move else None,
            "mac_moved_by": (None if move is None else
                             "gratuitous ARP" if move.by_ethertype == 0x0806 else
                             "guest traffic"),
            "announce_rounds_us": [us(t) for t in b["announcer"].fired] if "announcer" in b else [],
            "announce_acks_us": [us(t) for t in b["announcer"].acks] if "announcer" in b else [],
            "self_announce": sorted({o for _, o in b.get("self_announce", [])}),
        }

    def _check_direct_again(self, vf: Vf) -> None:
        """After a cancel the VF must be back to plain operation with nothing left over."""
        guest_maps = [(r.gpa, r.size) for r in vf.backend.memory.regions]
        maps = vf.model.iommu.mappings()
        if maps != guest_maps:
            self.leaked.append(f"{vf.model.name}: IOMMU mappings {maps} besides guest memory {guest_maps}")
        if vf.model.lm.logging_enabled:
            self.leaked.append(f"{vf.model.name}: hardware logging still on")
        if vf.driver.mode != "direct":
            self.leaked.append(f"{vf.model.name}: driver still in mode {vf.driver.mode}")

    # --- the run -------------------------------------------------------------------
    def run(self) -> dict:
        world = self.host.world
        wall0 = time.perf_counter()
        self._start_sampling()
        self._live = True
        self._open_stalls = [None] * self.pairs
        world.process(self._liveness())
        self.vm.guest.start()
        t = self.traffic
        if t["rx_pps"] > 0:
            flows = t["flows_per_pair"] * self.pairs
            self.gen = Generator(world, self.tester, t["frame_size"], flows=flows,
                                 flow_run=t["burst"], arrivals=Arrivals(world, t["rx_pps"], name="gen.arrivals",
                                                   **self._rx_pattern))
        if self.gen:
            self.gen.start()
        t_start = world.now_ns() / 1000
        self.progress("traffic", {})
        world.advance_ns(self.traffic["warmup_us"] * 1000)
        t_mig = world.now_ns() / 1000
        rams = [self.vm.ram]
        if self.scenario.kind == "migration":
            dst_ram = HostMemory(self.vm.ram.size, "dst-ram")
            rams.append(dst_ram)
            legs = [(self.vfs[0], self.vfs[1], self.vm.ram, dst_ram)]
            if self.mig["back_and_forth"]:
                legs.append((self.vfs[1], self.vfs[0], dst_ram, self.vm.ram))
            for i, (src, dst, sram, dram) in enumerate(legs):
                if i:
                    world.advance_ns(self.traffic["warmup_us"] * 1000)
                leg = self._migrate(src, dst, sram, dram)
                self.legs.append(leg)
                if not (leg.outcome.converged and not leg.outcome.cancelled):
                    break
        t_switch = world.now_ns() / 1000
        world.advance_ns(self.traffic["duration_us"] * 1000)
        t_end = world.now_ns() / 1000
        self.progress("drain", {})
        self._end_liveness()
        if self.gen:
            self.gen.stop()
        if self.responder:
            self.responder.stop()
        self.vm.guest.stop_tx()
        self._drain()
        result = self._report(t_start, t_mig, t_switch, t_end)
        result["wall_s"] = round(time.perf_counter() - wall0, 3)
        self.host.close()
        for ram in rams[1:]:
            ram.close()
        return result

    def _drain(self, step_us: float = 100.0, limit_us: float = 50_000.0) -> None:
        """Run until every frame in flight has landed: rings, FIFOs and wires quiet.

        A guest that is the bottleneck (64 B at 100 Gb/s) has thousands of
        frames queued when traffic stops; counting before they land would
        call them lost."""
        world = self.host.world
        quiet, waited, last = 0, 0.0, None
        while quiet < 3 and waited < limit_us:
            world.advance_ns(step_us * 1000)
            waited += step_us
            now = (self.vm.guest.rx_counts().frames, self.sink.counts().frames,
                   sum(sum(vf.model.datapath.stats()["queues"][q].get("fifo_frames", 0)
                           for q in vf.model.datapath.stats()["queues"]) for vf in self.vfs))
            quiet = quiet + 1 if now == last and not now[2] else 0
            last = now

    # --- invariants and the report ------------------------------------------------------
    def _vf_drops(self) -> dict:
        out = {}
        for vf in self.vfs:
            if vf.model.datapath.rx_no_queue:
                out["no_queue"] = out.get("no_queue", 0) + vf.model.datapath.rx_no_queue
            for q, st in vf.model.datapath.stats()["queues"].items():
                if st["kind"] == "rx":
                    for why in ("fifo_drops", "not_running_drops", "stop_drops", "too_big", "oversize"):
                        if st.get(why):
                            key = why.removesuffix("_drops")
                            out[key] = out.get(key, 0) + st[why]
        return out

    def _interrupt_counts(self) -> dict:
        guest = self.vm.guest
        out = {"delivery": guest.interrupts, "irq_none": guest.irq_none + sum(q.irq_none for q in guest.queues),
               "handled": {q.index: q.handled for q in guest.queues},
               "refill_work": sum(p.refill_works for p in guest.pairs)}
        if guest.interrupts == "intx":
            out["intx"] = guest.intx_interrupts
        return out

    def _exclusion(self) -> list[str]:
        """Times when a queue of one VF ran while a queue of another VF also ran."""
        def intervals(vf):
            spans, open_ = [], {}
            for cycle, q, running in vf.model.activity:
                if running:
                    open_.setdefault(q, cycle)
                elif q in open_:
                    spans.append((open_.pop(q), cycle, q))
            end = self.host.world.now
            spans += [(start, end, q) for q, start in open_.items()]
            return spans
        problems = []
        if len(self.vfs) < 2:
            return problems
        a, b = (intervals(vf) for vf in self.vfs)
        for s0, e0, q0 in a:
            for s1, e1, q1 in b:
                if s0 < e1 and s1 < e0:
                    problems.append(f"{self.vfs[0].model.name} queue {q0} [{s0}, {e0}) overlaps "
                                    f"{self.vfs[1].model.name} queue {q1} [{s1}, {e1}) (cycles)")
        return problems

    def _report(self, t_start, t_mig, t_switch, t_end) -> dict:
        guest = self.vm.guest
        rx = guest.rx_counts()
        tx = self.sink.counts()
        drops = self._vf_drops()
        dropped = sum(drops.values())
        offered = (self.gen.frames if self.gen else 0) + (self.responder.frames if self.responder else 0)
        rx_missing = offered - rx.frames
        # Copies the switch sent to VF ports beyond one per frame offered to the
        # guest (flooded frames, the guest's broadcasts) reach VFs the guest is
        # not on, which drop them: those drops explain no missing frame.
        to_vfs = sum(self.switch.ports[i].tx_frames for i in self.vf_ports.values())
        surplus = to_vfs - offered
        rx_unexplained = rx_missing - (dropped - surplus)
        tx_missing = guest.tx_frames() - tx.frames
        frames_lost = max(0, rx_unexplained) + max(0, tx_missing)
        frames_dup = rx.duplicates + rx.stale + tx.duplicates + tx.stale
        mismatched = sorted({p for leg in self.legs for p in leg.outcome.mismatched_pages})
        compared = any(leg.outcome.memory_compared for leg in self.legs)
        exclusion = self._exclusion()
        in_flight = {}
        for leg in self.legs:
            for q, (base, avail) in leg.in_flight.items():
                if avail != base:
                    in_flight.setdefault(f"{leg.src}->{leg.dst}", {})[q] = {
                        "base": base, "avail": avail, "descriptors": (avail - base) & 0xFFFF}
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} pages differ at switch-over: {mismatched[:20]}")
        if frames_lost:
            problems.append(f"{frames_lost} frames lost beyond what the VFs dropped "
                            f"(rx missing {rx_missing}, VF drops {dropped}, tx missing {tx_missing}); "
                            f"in flight at switch-over: {in_flight}")
        if frames_dup:
            problems.append(f"{frames_dup} frames duplicated; in flight at switch-over: {in_flight}")
        if rx.out_of_order or tx.out_of_order or rx.corrupted or tx.corrupted:
            problems.append(f"frames out of order or corrupted: rx {rx.as_dict()}, tx {tx.as_dict()}")
        problems += exclusion + self.leaked
        def where(ix):
            return (f"guest avail idx {ix['avail_idx']}, used idx {ix['used_idx']}, used_event "
                    f"{ix['used_event']}, avail_event {ix['avail_event']}, {ix['guest_in_flight']} "
                    f"buffers posted; {ix['vf']} last_avail {ix['vf_last_avail']}, last_used "
                    f"{ix['vf_last_used']}, starvations {ix['vf_starvations']}, fifo_drops "
                    f"{ix['vf_fifo_drops']}")
        for st in self.stalls:
            ix = st["indexes"]
            until = f"{st['to_us']} us" if st["to_us"] is not None else "the end of the traffic"
            problems.append(
                f"RX stall on queue {st['queue']}: no delivery from {st['from_us']} us until {until} "
                f"({st['gap_us']} us > max_rx_gap_us {round(self.rx_gap_bound_us, 3)}; "
                f"{st.get('offered_during', 0)} frames offered meanwhile); at {st['detected_us']} us: "
                + where(ix)
                + (f"; at {st['last_us']} us: " + where(st["indexes_last"])
                   if "indexes_last" in st else ""))
        problems += [f"guest: {e}" for e in guest.errors]
        for vf in self.vfs:
            problems += [f"{vf.model.name}: {e}" for e in vf.model.errors]
        last = self.legs[-1].outcome if self.legs else None
        expect = self.scenario.section("expect")
        if self.legs:
            converged = all(l.outcome.converged for l in self.legs)
            cancelled = any(l.outcome.cancelled for l in self.legs)
            if not cancelled and converged != expect["converged"]:
                problems.append(f"the migration {'converged' if converged else 'did not converge'}; "
                                f"the scenario expects it {'to' if expect['converged'] else 'not to'}")
            if cancelled != expect["cancelled"]:
                problems.append(f"cancelled: {cancelled}, expected {expect['cancelled']}")
        network = {
            "guest_mac": mac_text(self.guest_mac),
            "guest_announce": bool(self.vm.features >> vr.F_NET_GUEST_ANNOUNCE & 1),
            "announce_params_ms": {"initial": self.announce_params.initial_ms,
                                   "max": self.announce_params.max_ms,
                                   "rounds": self.announce_params.rounds,
                                   "step": self.announce_params.step_ms},
            "announce_acks": sum(len(a.acks) for a in self.announcers),
            "gratuitous_arps": self.vm.guest.announces,
            "blackout": [self._blackout_report(l) for l in self.legs if l.blackout],
            "switch": self.switch.counters(),
            "copies_dropped_elsewhere": surplus,
            "tester_other_frames": self.tester_other,
        }
        migration = {}
        if self.legs:
            migration = {
                "mode": "sw" if self.devargs.sw_live_migration else "hw",
                "legs": len(self.legs),
                "iterations": sum(len(l.outcome.iterations) for l in self.legs),
                "converged": all(l.outcome.converged for l in self.legs),
                "cancelled": any(l.outcome.cancelled for l in self.legs),
                "downtime_us": round(max(l.outcome.downtime_ns for l in self.legs) / 1000, 3),
                "total_time_us": round(sum(l.outcome.total_ns for l in self.legs) / 1000, 3),
                "stop_copy_pages": last.stop_copy_pages,
                "per_iteration": [
                    {"leg": i, "iteration": it.index, "pages_copied": it.pages_copied,
                     "dirty_log_pages": it.dirty_log_pages, "dirty_cpu_pages": it.dirty_cpu_pages,
                     "remaining_pages": it.remaining_pages, "duration_us": round(it.duration_ns / 1000, 3),
                     "stream_bytes": it.stream_bytes, "zero_pages": it.zero_pages}
                    for i, l in enumerate(self.legs) for it in l.outcome.iterations],
                "bases": {f"{l.src}->{l.dst}": l.outcome.bases for l in self.legs},
                "skipped_dirty_marks": sorted({p for l in self.legs for p in l.skipped_pages}),
            }
        return {
            "scenario": self.scenario.name,
            "kind": self.scenario.kind,
            "seed": self.scenario.seed,
            "ok": not problems,
            "problems": problems,
            "invariants": {
                "memory_equal": (not mismatched) if compared else None,
                "mismatched_pages": mismatched,
                "frames_lost": frames_lost,
                "frames_duplicated": frames_dup,
                "in_order": not (rx.out_of_order or tx.out_of_order),
                "exclusive": not exclusion,
                "in_flight_at_switchover": in_flight,
                "live": not self.stalls,
                "max_rx_gap_us": round(self.rx_gap_bound_us, 3),
                "rx_stalls": self.stalls,
            },
            "migration": migration,
            "network": network,
            "traffic": {
                "tx_frames": tx.frames, "rx_frames": rx.frames,
                "tx_sent_by_guest": guest.tx_frames(), "rx_offered": offered,
                "rx_offered_per_pair": list(self.offered),
                "rx_replies": self.responder.frames if self.responder else 0,
                "interrupts": self._interrupt_counts(),
                "rx_dropped_by_vf": drops,
                "before": self._rate(t_start, t_mig),
                "during": self._rate(t_mig, t_switch),
                "after": self._rate(t_switch, t_end),
            },
            "timeline": [[s.t_us, s.rx_bytes, s.tx_bytes] for s in self.samples],
            "phases_us": {"traffic_start": t_start, "migration_start": t_mig,
                          "switchover": [round(l.outcome.switchover_ns / 1000, 3) for l in self.legs
                                         if l.outcome.switchover_ns],
                          "end": t_end},
            "simulated_us": round(t_end - t_start, 3),
            "trace_digest": self.host.world.digest(),
        }


def run(scenario: Scenario, progress=None) -> dict:
    return MigrationRun(scenario, progress).run()
