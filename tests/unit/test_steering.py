"""sim/steering.py: flow keys of guest-controlled frames, learned pairs, the fallback, the bound."""
from __future__ import annotations

import zlib

import pytest

from sim.frames import FrameBatch
from sim.steering import HEADER_BYTES, FlowSteering, flow_key
from sim.testing.flows import (GUEST, GUEST_IP4, GUEST_IP6, PEER, PEER_IP4, PEER_IP6, in4, out4,
                               udp4, udp6)

def batch(*frames) -> FrameBatch:
    b = FrameBatch()
    for i, f in enumerate(frames):
        b.append(f, 100 + i)
    return b


def steering(active=(0, 1, 2, 3), **kw) -> tuple[FlowSteering, list]:
    """A FlowSteering whose pairs in use are ``box[0]`` (change it to change them)."""
    box = [tuple(active)]
    return FlowSteering(lambda: box[0], **kw), box


# --- flow keys -------------------------------------------------------------------------
def test_an_answer_has_the_key_of_the_frame_it_answers():
    assert flow_key(out4(1000), True) == flow_key(in4(1000), False)
    assert flow_key(out4(1000), True) != flow_key(in4(1001), False)
    out6 = udp6(GUEST, PEER, GUEST_IP6, PEER_IP6, 5, 6)
    in6 = udp6(PEER, GUEST, PEER_IP6, GUEST_IP6, 6, 5)
    assert flow_key(out6, True) == flow_key(in6, False)
    assert flow_key(out6, True) != flow_key(udp6(PEER, GUEST, PEER_IP6, GUEST_IP6, 6, 7), False)


def test_the_key_holds_macs_addresses_protocol_and_ports():
    key = flow_key(out4(0x1234, 0x5678), True)
    assert key == GUEST + PEER + b"\x04" + GUEST_IP4 + PEER_IP4 + b"\x11" + b"\x12\x34\x56\x78"


def test_vlan_tags_are_skipped_and_ip_options_honoured():
    plain = out4(7)
    tagged = plain[:12] + b"\x81\x00\x00\x05" + plain[12:]
    qinq = plain[:12] + b"\x88\xa8\x00\x06\x81\x00\x00\x05" + plain[12:]
    assert flow_key(tagged, True) == flow_key(qinq, True) == flow_key(plain, True)
    with_options = udp4(GUEST, PEER, GUEST_IP4, PEER_IP4, 7, 9, ihl=15)
    assert flow_key(with_options, True) == flow_key(plain, True)


def test_fragments_key_on_addresses_only():
    first = udp4(GUEST, PEER, GUEST_IP4, PEER_IP4, 1, 2, frag=0x2000)     # MF
    later = udp4(GUEST, PEER, GUEST_IP4, PEER_IP4, 3, 4, frag=0x0010)     # offset, no ports
    assert flow_key(first, True) == flow_key(later, True) == GUEST + PEER + b"\x04" + \
        GUEST_IP4 + PEER_IP4 + b"\x11"


@pytest.mark.parametrize("cut", range(0, 14 + 20 + 4))
def test_a_cut_frame_keys_on_what_it_holds(cut):
    """Every prefix of a frame: no exception, and a key that never reads past the end."""
    frame = out4(1)
    key = flow_key(frame[:cut], True)
    if cut < 14:
        assert key is None
    elif cut < 14 + 20:
        assert key == GUEST + PEER
    elif cut < 14 + 24:
        assert key == GUEST + PEER + b"\x04" + GUEST_IP4 + PEER_IP4 + b"\x11"


@pytest.mark.parametrize("bad", [
    b"\xff" * 14,                                                   # unknown ethertype
    GUEST + PEER + b"\x08\x00" + b"\x65" + bytes(40),                # IPv4 claiming version 6
    GUEST + PEER + b"\x08\x00" + b"\x44" + bytes(40),                # IHL 4 (< 5)
    GUEST + PEER + b"\x08\x00" + b"\x4f" + bytes(40),                # IHL 15 past the end
    GUEST + PEER + b"\x86\xdd" + b"\x40" + bytes(60),                # IPv6 claiming version 4
    GUEST + PEER + b"\x81\x00" * 10,                                 # VLAN tags without end
])
def test_malformed_headers_key_on_the_macs(bad):
    assert flow_key(bad, True) == bad[6:12] + bad[0:6]


def test_the_key_never_needs_more_than_header_bytes():
    long = udp4(GUEST, PEER, GUEST_IP4, PEER_IP4, 7, 9, ihl=15)
    tagged = long[:12] + b"\x81\x00\x00\x05\x81\x00\x00\x06" + long[12:]
    assert flow_key(tagged[:HEADER_BYTES], True) == flow_key(tagged, True)


# --- learning and picking --------------------------------------------------------------
def test_a_flow_is_answered_on_the_pair_it_last_transmitted_on():
    s, _ = steering()
    s.learn(2, batch(out4(1000)))
    s.learn(3, batch(out4(1001)))
    assert s.pick(in4(1000), (0, 1, 2, 3)) == 2
    assert s.pick(in4(1001), (0, 1, 2, 3)) == 3
    s.learn(1, batch(out4(1000)))             # the flow moved (the sender changed CPU)
    assert s.pick(in4(1000), (0, 1, 2, 3)) == 1
    assert s.hits == 3 and s.fallbacks == 0


def test_unlearned_flows_hash_over_the_pairs_in_use_only():
    s, _ = steering()
    for active in ((0,), (0, 1), (0, 1, 2)):
        picks = {s.pick(in4(port), active) for port in range(200)}
        assert picks == set(active)
    key = flow_key(in4(77), False)
    assert s.pick(in4(77), (0, 1, 2)) == (0, 1, 2)[zlib.crc32(key) % 3]   # deterministic
    assert s.fallbacks == 601 and s.hits == 0


def test_a_learned_pair_no_longer_in_use_is_never_used():
    s, box = steering()
    s.learn(3, batch(*(out4(port) for port in range(50))))
    box[0] = (0, 1)                                  # ethtool -L combined 2
    parts = s.split(batch(*(in4(port) for port in range(50))))
    assert {pair for pair, _ in parts} <= {0, 1}
    assert sum(len(p) for _, p in parts) == 50
    box[0] = (0, 1, 2, 3)
    assert s.split(batch(in4(5)))[0][0] == 3        # in use again: learned pair again


def test_no_pair_in_use_sends_to_pair_0():
    s, _ = steering(active=())
    s.learn(1, batch(out4(1)))
    assert s.split(batch(in4(1)))[0][0] == 0


def test_split_keeps_arrival_order_per_pair_and_times():
    s, _ = steering()
    s.learn(1, batch(out4(1)))
    s.learn(2, batch(out4(2)))
    frames = [in4(1), in4(2), in4(1), in4(2), in4(1)]
    parts = dict(s.split(batch(*frames)))
    assert sorted(parts) == [1, 2]
    assert [bytes(parts[1].data[o:o + n]) for o, n, _ in parts[1].frames()] == [frames[0]] * 3
    assert list(parts[1].times) == [100, 102, 104]
    assert list(parts[2].times) == [101, 103]


def test_a_batch_for_one_pair_is_passed_on_without_a_copy():
    s, _ = steering()
    s.learn(1, batch(out4(1)))
    b = batch(in4(1), in4(1))
    assert s.split(b) == [(1, b)]
    assert s.split(FrameBatch()) == []


def test_runts_and_malformed_frames_are_steered_not_raised():
    s, _ = steering(active=(0, 1))
    b = batch(b"", b"\x01", bytes(13), b"\xff" * 60, GUEST + PEER + b"\x08\x00\x4f")
    s.learn(1, b)                                    # TX of such frames teaches nothing harmful
    parts = s.split(b)
    assert sum(len(p) for _, p in parts) == 5
    assert {pair for pair, _ in parts} <= {0, 1}


def test_the_table_is_bounded_and_forgets_the_least_recently_transmitted():
    s, _ = steering(max_flows=8)
    for port in range(8):
        s.learn(1, batch(out4(port)))
    s.learn(1, batch(out4(0)))                       # flow 0 transmits again: most recent
    s.learn(2, batch(*(out4(port) for port in range(100, 1100))))
    assert len(s.flows) == 8 and s.evicted == 1000
    s2, _ = steering(max_flows=8)
    for port in range(8):
        s2.learn(1, batch(out4(port)))
    s2.learn(1, batch(out4(0)))
    s2.learn(2, batch(out4(500)))                    # one more: evicts flow 1, not flow 0
    assert flow_key(out4(0), True) in s2.flows and flow_key(out4(1), True) not in s2.flows
    with pytest.raises(ValueError):
        FlowSteering(lambda: (0,), max_flows=0)


def test_with_one_pair_in_use_no_frame_is_looked_at():
    s, _ = steering(active=(0,))
    s.learn(3, batch(out4(1)))
    b = batch(in4(1), b"\x00")
    assert s.split(b) == [(0, b)]
    assert s.hits == s.fallbacks == 0
