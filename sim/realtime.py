"""Real-time mode: the simulated world follows the wall clock.

When a real front-end (QEMU) drives the simulated VF, simulated time has to
keep up with real time: the event loop that serves the vhost-user socket
calls ``sync()`` each time round, and turns readable eventfds that the model
watches (kicks written by the guest in another process) into
``notify_watchers`` calls, which nothing inside this process would otherwise
make.  Control-plane sleeps may run the world ahead of the wall clock; it
then simply waits for the wall clock to catch up.
"""
from __future__ import annotations

import select
import time

from sim.world import World


class RealtimeClock:
    def __init__(self, world: World):
        self.world = world
        self._start_wall = time.monotonic_ns()
        self._start_sim = world.now

    def target(self) -> int:
        """The simulated cycle that corresponds to now."""
        return self._start_sim + self.world.cycles(time.monotonic_ns() - self._start_wall)

    def sync(self) -> None:
        """Run the world up to the wall clock, waking watchers of fds that became readable."""
        watched = self.world.watched_fds()
        if watched:
            poller = select.poll()
            for fd in watched:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(0):
                self.world.notify_watchers(fd)
        self.world.run_until(self.target())
