"""The guest and the traffic endpoints against the real device side: a VF brought up through
ifcvf.hw over hal.sim, its queue engines and its wire port (ifcvf.tools.benchmarks.stack.build_stack)."""
import pytest

from ifcvf.tools.benchmarks.stack import build_stack
from sim import virtio_regs as vr
from sim.guest import SUPPORTED_FEATURES
from sim.traffic import Generator, Sink, steer_by_flow
from sim.wire import Port, connect
from sim.world import World

V1, MRG, EVT, IND = vr.F_VERSION_1, vr.F_NET_MRG_RXBUF, vr.F_EVENT_IDX, vr.F_INDIRECT_DESC


def without(*bits):
    return SUPPORTED_FEATURES & ~vr.feature_mask(*bits)


def run(*, pairs=1, wanted=None, rx_frames=300, tx_frames=300, rx_size="64-1518",
        tx_size="64-1518", rate=10.0, sim_us=2000, seed=1, **guest_kw):
    world = World(seed)
    flows = 2 * pairs
    dp = build_stack(world, pairs=pairs, queue_size=64, burst=16, wanted=wanted,
                        tx_rate_gbps=rate, tx_sizes=tx_size, tx_flows=2, tx_frames=tx_frames,
                        rx_flows=flows, **guest_kw)
    try:
        fn, guest = dp.model, dp.guest
        tester = Port(world, "tester")
        connect(fn.port, tester)
        fn.datapath.steer = steer_by_flow(pairs)
        sink = Sink(world, tester, flows=pairs * 2, flow_base=guest.tx_flow_base)
        gen = Generator(world, tester, rx_size, rate_gbps=rate, burst=8, flows=flows,
                        flow_run=8, max_frames=rx_frames)
        guest.start()
        gen.start()
        world.advance_ns(sim_us * 1000)
        return dict(world=world, guest=guest, sink=sink, gen=gen, fn=fn,
                    features=dp.features, stats=fn.datapath.stats(), digest=world.digest())
    finally:
        dp.close()


@pytest.mark.parametrize("wanted", [None, without(MRG), without(EVT), without(MRG, EVT),
                                    without(IND), without(V1, MRG)],
                         ids=["all", "no-mrg", "no-event-idx", "no-mrg-no-event-idx",
                              "no-indirect", "10-byte-header"])
def test_both_directions_arrive_intact_through_the_device(wanted):
    r = run(wanted=wanted)
    assert r["guest"].hdr_len == (10 if wanted == without(V1, MRG) else 12)
    assert r["fn"].errors == [] and r["guest"].errors == []
    rx, sink = r["guest"].rx_counts(), r["sink"].counts()
    assert rx.good == r["gen"].frames == 300 and rx.clean, rx
    assert sink.good == r["guest"].tx_frames() == 300 and sink.clean, sink


@pytest.mark.parametrize("chain", ["single", "split", "indirect"])
def test_tx_chain_shapes_through_the_tx_engine(chain):
    r = run(tx_chain=chain, rx_frames=10, tx_frames=400, rate=20)
    sink = r["sink"].counts()
    assert sink.good == 400 and sink.clean
    assert r["fn"].errors == []


def test_mergeable_rx_buffers_through_the_rx_engine():
    r = run(rx_buffer_size=512, rx_size=1518, rx_frames=200, tx_frames=1)
    rx = r["guest"].rx_counts()
    assert rx.good == 200 and rx.clean
    # 1514 + 12 bytes over 512-byte buffers: 3 used entries per frame
    assert r["guest"].queues[0].c.completed == 600


def test_several_pairs_with_rx_steering_keep_every_flow_in_order():
    r = run(pairs=3, rx_frames=600, tx_frames=200, rate=30)
    rx, sink = r["guest"].rx_counts(), r["sink"].counts()
    assert rx.good == 600 and rx.clean
    assert sink.good == 600 and sink.clean
    for p in range(3):
        assert r["guest"].rx_counts(p).good > 0


def test_guest_cpu_binds_at_64_bytes_and_the_vf_drops_what_it_cannot_place():
    r = run(rx_size=64, tx_size=64, rate=100, rx_frames=20000, tx_frames=None, sim_us=3000)
    guest = r["guest"]
    assert max(guest.utilisation()) > 0.95
    dropped = sum(q["dropped"] for q in r["stats"]["queues"].values() if q["kind"] == "rx")
    assert dropped > 0
    rx = guest.rx_counts()
    assert rx.corrupted == rx.duplicates == rx.out_of_order == 0 and rx.lost > 0


def test_the_full_datapath_is_deterministic():
    a = run(seed=9, rx_size="imix", tx_size="imix")
    b = run(seed=9, rx_size="imix", tx_size="imix")
    assert a["digest"] == b["digest"]
    assert a["guest"].counts() == b["guest"].counts()
