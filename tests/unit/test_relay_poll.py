"""The relay's adaptive polls: entries the VF completes without interrupting still reach the guest.

The VF reads used_event (or avail->flags) from the guest's avail ring, which
the guest sets from what the relay showed it: whenever the guest's value is
behind the VF, the VF completes entries silently.  Each relay says whether
the VF will interrupt for its next entries (``IFC_RELAY_POLL_*``), and the
notify relay polls accordingly: soon while the VF may complete silently,
slowly while it will interrupt, not at all while it holds no buffer.
"""
from __future__ import annotations

import json
import os

from ifcvf.tools.cli import main
from ifcvf.relay import NotifyQueue, NotifyRelay
from test_relay_notify import WAIT, Rig, readable, take

MIN_NS, MAX_NS = 20_000, 1_000_000


def relay_with_poll(rig: Rig, min_ns: int = MIN_NS, max_ns: int = MAX_NS, *,
                    event_idx: bool = True) -> NotifyRelay:
    rig.relay.close()
    rig.queue.close()
    rig.queue = rig.guest.queue(event_idx=event_idx)
    rig.relay = NotifyRelay("poll", [NotifyQueue(0, kick_fd=rig.kick[0], doorbell=rig.doorbells[0],
                                                 relay=rig.queue, intr_fd=rig.intr, call_fd=rig.call)],
                            poll_min_ns=min_ns, poll_max_ns=max_ns)
    return rig.relay


def test_thread_relays_entries_that_came_without_an_interrupt():
    rig = Rig()
    try:
        rig.guest.post(4)
        relay = relay_with_poll(rig, 200_000, 400_000)
        relay.start()
        rig.guest.device_used((3, 100))
        os.eventfd_write(rig.intr, 1)
        assert readable(rig.call, WAIT) and take(rig.call) == 1
        rig.guest.set_used_event(1)               # the guest consumed it and re-armed
        rig.guest.device_used((5, 200))           # no interrupt this time
        assert readable(rig.call, WAIT), "the poll did not relay the second entry"
        relay.stop(WAIT)
        assert rig.guest.guest_used()[1] == 2
        stats = relay.stats(0)
        assert stats.interrupts == 1 and stats.relayed == 2 and stats.polls >= 1
    finally:
        rig.close()


def test_polls_fast_while_the_guest_used_event_is_behind_the_device():
    rig = Rig()
    try:
        rig.guest.post(8)
        relay = relay_with_poll(rig)
        assert relay.next_poll_ns() == MIN_NS     # nothing known yet: look soon
        rig.guest.set_used_event(0)
        rig.guest.device_used((1, 64))
        os.eventfd_write(rig.intr, 1)
        relay.step()
        # The guest asked for an interrupt at 0; the VF is at 1 with 7 buffers
        # left, so it would never interrupt again: poll soon.
        assert relay.next_poll_ns() == MIN_NS
        rig.guest.device_used((2, 64))            # completed silently
        assert rig.call in relay.poll() or rig.guest.guest_used()[1] == 2
        assert rig.guest.guest_used()[1] == 2
        relay.poll()                              # nothing new: back off
        assert relay.next_poll_ns() == 2 * MIN_NS
        relay.poll()
        assert relay.next_poll_ns() == 4 * MIN_NS
    finally:
        rig.close()


def test_polls_slowly_once_the_device_will_interrupt_or_holds_nothing():
    rig = Rig()
    try:
        rig.guest.post(4)
        relay = relay_with_poll(rig)
        rig.guest.device_used((1, 64))
        os.eventfd_write(rig.intr, 1)
        rig.guest.set_used_event(1)               # the guest consumed it and re-armed
        relay.step()
        assert relay.next_poll_ns() == MAX_NS     # the VF interrupts at its next entry
        for i in range(2, 5):                     # the VF uses every buffer it holds
            rig.guest.device_used((i, 64))
        relay.poll()
        assert rig.guest.guest_used()[1] == 4
        assert relay.next_poll_ns() == MAX_NS     # holds no buffer: only its kick request to copy
        rig.guest.post(2)
        os.eventfd_write(rig.kick[0], 1)          # new buffers and a kick: look again
        relay.step()
        assert relay.next_poll_ns() == MIN_NS
    finally:
        rig.close()


def test_used_flags_and_avail_event_reach_the_guest_without_new_entries():
    rig = Rig()
    try:
        rig.guest.post(4)
        relay = relay_with_poll(rig)
        rig.guest.device_header(flags=1, avail_event=7)   # the VF asks for a kick at 7
        relay.poll()
        assert rig.guest.guest_header() == (1, 7)
    finally:
        rig.close()


def test_without_event_idx_the_no_interrupt_flag_decides():
    rig = Rig()
    try:
        rig.guest.post(4)
        relay = relay_with_poll(rig, event_idx=False)
        rig.guest.set_avail(flags=1)              # the guest polls: VRING_AVAIL_F_NO_INTERRUPT
        relay.poll()
        assert relay.next_poll_ns() == MIN_NS
        rig.guest.set_avail(flags=0)
        relay.poll()
        assert relay.next_poll_ns() == MAX_NS
    finally:
        rig.close()


def test_bench_relay_poll_reports_the_cost_of_each_state(tmp_path):
    """The benchmark's own sanity: it measures polls in every state."""

    out = tmp_path / "poll.json"
    assert main(["bench", "relay-poll", "--queues", "2", "--seconds", "0.05", "--repeat", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    states = {s["state"]: s for s in result["states"]}
    assert all(states[name]["polls_per_s"] > 0 for name in ("armed", "stale", "empty"))
    assert result["ns_per_poll"] > 0


def test_the_relay_kicks_for_a_guest_that_published_past_a_stale_avail_event():
    """The VF asks for a kick at buffer 2 in its (mediated) used ring; the guest,
    reading the old copy, published buffers 0..3 without kicking.  The relay
    mirrors the request, sees the guest already past it, and kicks for it."""
    rig = Rig()
    try:
        rig.guest.post(4)
        relay = relay_with_poll(rig)
        rig.guest.device_header(flags=0, avail_event=2)
        relay.poll()
        assert rig.doorbell(0) == b"\x00\x00\xAA\xAA"       # queue 0's index, one 16-bit store
        assert relay.stats(0).relay_kicks == 1
    finally:
        rig.close()


def test_no_kick_when_the_guest_has_not_reached_the_new_avail_event():
    rig = Rig()
    try:
        rig.guest.post(4)
        relay = relay_with_poll(rig)
        rig.guest.device_header(flags=0, avail_event=4)     # the guest will kick itself at 4
        relay.poll()
        assert rig.doorbell(0) == b"\xAA" * 4 and relay.stats(0).relay_kicks == 0
    finally:
        rig.close()
