"""Direct-mode relay: guest kicks to VF doorbells, VF config interrupts to the back-end.

A Poller (see hal.api): the VFIO backend runs ``run()`` on a thread, the
simulator calls ``step()`` at modelled times.  Doorbell writes are exact
16-bit stores done by the callback the driver gives (it knows the offsets).
"""
from __future__ import annotations

import os
import select
from typing import Callable


class NotifyRelay:
    def __init__(self, name: str, kicks: dict[int, int], doorbell: Callable[[int], None],
                 config_fd: int | None = None, on_config: Callable[[], None] | None = None):
        self.name = name
        self.kicks = dict(kicks)          # queue index -> kick eventfd
        self.doorbell = doorbell
        self.config_fd = config_fd
        self.on_config = on_config
        self.kicks_relayed = {q: 0 for q in self.kicks}
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        for fd in self.fds():
            self._poll.register(fd, select.POLLIN)
        self._by_fd = {fd: q for q, fd in self.kicks.items()}

    def fds(self) -> list[int]:
        return list(self.kicks.values()) + ([self.config_fd] if self.config_fd is not None else [])

    def _handle(self, ready: list[int]) -> None:
        for fd in ready:
            try:
                os.eventfd_read(fd)  # drain: one doorbell however many kicks piled up
            except BlockingIOError:
                continue
            if fd == self.config_fd:
                if self.on_config:
                    self.on_config()
                continue
            q = self._by_fd[fd]
            self.kicks_relayed[q] += 1
            self.doorbell(q)

    def step(self) -> list[int]:
        self._handle([fd for fd, _ in self._poll.poll(0)])
        return []

    def run(self) -> None:
        self._poll.register(self._stop_fd, select.POLLIN)
        try:
            while True:
                ready = [fd for fd, _ in self._poll.poll(1000)]
                if self._stop_fd in ready:
                    return
                self._handle(ready)
        finally:
            self._poll.unregister(self._stop_fd)

    def stop(self) -> None:
        os.eventfd_write(self._stop_fd, 1)

    def close(self) -> None:
        os.close(self._stop_fd)
