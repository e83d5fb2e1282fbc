"""The relay's follow-up poll: entries the VF completes without interrupting still reach the guest.

With EVENT_IDX the VF reads used_event from the guest's avail ring, and the
guest sets it from what the relay published: once the VF is past it, the VF
stops interrupting.  After any relay that moved entries, the relay looks
again ``poll_ns`` later, on a timer in its thread and at modelled times in
the simulator (``poll_due`` / ``poll``).
"""
from __future__ import annotations

import os

from ifcvf.relay import NotifyQueue, NotifyRelay
from test_relay_notify import WAIT, Rig, readable, take


def relay_with_poll(rig: Rig, poll_ns: int) -> NotifyRelay:
    rig.relay.close()
    rig.relay = NotifyRelay("poll", [NotifyQueue(0, kick_fd=rig.kick[0], doorbell=rig.doorbells[0],
                                                 relay=rig.queue, intr_fd=rig.intr, call_fd=rig.call)],
                            poll_ns=poll_ns)
    return rig.relay


def test_thread_relays_entries_that_came_without_an_interrupt():
    rig = Rig()
    try:
        relay = relay_with_poll(rig, 200_000)
        relay.start()
        rig.guest.device_used((3, 100))
        os.eventfd_write(rig.intr, 1)
        assert readable(rig.call, WAIT) and take(rig.call) == 1
        rig.guest.device_used((5, 200))           # no interrupt this time
        assert readable(rig.call, WAIT), "the follow-up poll did not relay the second entry"
        relay.stop(WAIT)
        assert rig.guest.guest_used()[1] == 2
        assert relay.stats(0).interrupts == 1 and relay.stats(0).relayed == 2
    finally:
        rig.close()


def test_step_mode_asks_for_a_poll_only_after_moving_entries():
    rig = Rig()
    try:
        relay = relay_with_poll(rig, 50_000)
        assert relay.step() == [] and not relay.poll_due()
        rig.guest.device_used((1, 64))
        os.eventfd_write(rig.intr, 1)
        relay.step()
        assert relay.poll_due()
        rig.guest.device_used((2, 64))            # completed silently
        relay.step()
        assert rig.guest.guest_used()[1] == 1    # a step without an interrupt relays nothing
        assert rig.call in relay.poll()           # the poll does, and signals the guest
        assert rig.guest.guest_used()[1] == 2 and relay.poll_due()
        relay.poll()
        assert not relay.poll_due()               # nothing moved: polling stops
    finally:
        rig.close()
