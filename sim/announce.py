"""The QEMU role after an incoming migration: announcing where the guest now is.

Two mechanisms, as QEMU 7.2 has them (reference linux-virtio-net.md B.2, B.3):

- ``VirtioNetAnnounce``: virtio-net's own announce timer, for a guest that
  acked ``VIRTIO_NET_F_GUEST_ANNOUNCE`` (and ``CTRL_VQ``).
  ``virtio_net_post_load_device`` arms it for "now" with ``round = rounds``;
  each firing (``virtio_net_announce_timer``) does ``round--``, sets
  ``VIRTIO_NET_S_ANNOUNCE`` in the config status and raises the config
  interrupt (``virtio_notify_config``: nothing without DRIVER_OK).  The next
  round is armed only by the guest's ``ANNOUNCE_ACK`` on the control queue
  (``virtio_net_handle_announce``: accepted only while the bit is set; clears
  it; ``qemu_announce_timer_step`` if rounds remain).  With QEMU's defaults
  that is five notifications, 50, 150, 250 and 350 ms after each ACK; a guest
  that never ACKs gets one.  The control queue is QEMU's, never the vhost-user
  back-end's (B.4): the guest model calls ``handle_ack`` directly, which is
  what QEMU's ``virtio_net_handle_ctrl`` does with that command.
- ``announce_self``: ``qemu_announce_self`` (REALTIME clock, rounds at 0, 50,
  200, 450 and 800 ms by default) sends a RARP to each NIC's peer; a
  vhost-user peer turns it into ``vhost_user_migration_done``
  (``migration_done`` here): nothing if the guest acked GUEST_ANNOUNCE, else
  ``SEND_RARP`` when ``PROTOCOL_F_RARP`` was negotiated, else -ENOTSUP (QEMU
  prints "fails to broadcast fake RARP" once and carries on).

Time: QEMU's virtual and realtime clocks are both the world's clock here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ifcvf.vhost import protocol as p
from sim import virtio_regs as vr
from sim.world import World

GUEST_ANNOUNCED = "guest-announce"
SENT_RARP = "send-rarp"
UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class AnnounceParams:
    """QEMU's announce-initial, -max, -rounds, -step (migration.c 114-117)."""

    initial_ms: float = 50.0
    max_ms: float = 550.0
    rounds: int = 5
    step_ms: float = 100.0

    def __post_init__(self):
        # migrate_params_check (1539-1564): initial <= 100 s, max <= 100 s and
        # >= initial, rounds <= 1000, step 1 ms .. 10 s
        if not 0 <= self.initial_ms <= 100_000 or not self.initial_ms <= self.max_ms <= 100_000:
            raise ValueError(f"announce initial {self.initial_ms} ms / max {self.max_ms} ms")
        if not 0 <= self.rounds <= 1000 or not 1 <= self.step_ms <= 10_000:
            raise ValueError(f"announce rounds {self.rounds} / step {self.step_ms} ms")

    def delay_ms(self, round_: int) -> float:
        """qemu_announce_timer_step (net/announce.c 20-34) with ``round`` left."""
        step = self.initial_ms + (self.rounds - round_ - 1) * self.step_ms
        return self.max_ms if step < 0 or step > self.max_ms else step


class VirtioNetAnnounce:
    """virtio-net's announce timer and config status, on one side of a migration.

    ``notify_config()`` is the config interrupt to the guest; ``status``
    is what the guest reads from the config space (LINK_UP, and ANNOUNCE
    while a round waits for its ACK)."""

    def __init__(self, world: World, features: int, notify_config: Callable[[], None], *,
                 params: AnnounceParams = AnnounceParams(), name: str = "qemu-announce"):
        self.world = world
        self.features = features
        self.notify_config = notify_config
        self.params = params
        self.name = name
        self.status = vr.NET_S_LINK_UP
        self.round = 0
        self.fired: list[int] = []      # cycles of each notification
        self.acks: list[int] = []
        self.refused = 0
        self._armed = None

    @property
    def negotiated(self) -> bool:
        return bool(self.features >> vr.F_NET_GUEST_ANNOUNCE & 1
                    and self.features >> vr.F_NET_CTRL_VQ & 1)

    def post_load(self) -> None:
        """virtio_net_post_load_device: arm for now, ``round = rounds``."""
        if not self.negotiated or not self.params.rounds:
            return
        self.round = self.params.rounds
        self._arm(self.world.now)

    def _arm(self, at: int) -> None:
        token = object()
        self._armed = token
        self.world.call_at(at, lambda _ev: self._fire(token))

    def _fire(self, token) -> None:
        if token is not self._armed:
            return
        self._armed = None
        self.round -= 1
        self.status |= vr.NET_S_ANNOUNCE
        self.fired.append(self.world.now)
        self.world.record(self.name, "announce_round", left=self.round)
        self.notify_config()

    def handle_ack(self) -> bool:
        """virtio_net_handle_announce: VIRTIO_NET_OK (True) only while the bit is set."""
        if not self.status & vr.NET_S_ANNOUNCE:
            self.refused += 1
            return False
        self.status &= ~vr.NET_S_ANNOUNCE
        self.acks.append(self.world.now)
        if self.round:
            self._arm(self.world.now + self.world.cycles(self.params.delay_ms(self.round) * 1e6))
        return True

    def read_status(self) -> int:
        return self.status

    def stop(self) -> None:
        self._armed = None


def migration_done(frontend, mac: bytes, acked_features: int) -> str:
    """vhost_user_migration_done (vhost-user.c 2251-2273) for one RARP of announce_self."""
    if acked_features >> vr.F_NET_GUEST_ANNOUNCE & 1:
        return GUEST_ANNOUNCED
    if frontend.protocol_features >> p.ProtocolFeature.RARP & 1:
        frontend.send(p.Request.SEND_RARP, p.U64(int.from_bytes(bytes(mac) + bytes(2), "little")))
        return SENT_RARP
    return UNSUPPORTED


def announce_self(world: World, frontend, mac: bytes, acked_features: int, *,
                  params: AnnounceParams = AnnounceParams(),
                  results: list | None = None) -> list:
    """qemu_announce_self: round 1 now, then each ``delay_ms`` later; each
    round's RARP reaches the vhost-user peer as ``migration_done``.  Returns
    the list that collects (cycle, outcome) per round."""
    out = [] if results is None else results
    state = {"round": params.rounds}

    def one(_ev=None):
        if frontend.sock.fileno() < 0:
            return                      # that QEMU is gone (a later migration)
        state["round"] -= 1
        outcome = migration_done(frontend, mac, acked_features)
        out.append((world.now, outcome))
        world.record(frontend.name, "announce_self", outcome=outcome, left=state["round"])
        if state["round"] > 0:
            world.call_at(world.now + world.cycles(params.delay_ms(state["round"]) * 1e6), one)

    if params.rounds:
        one()
    return out


__all__ = ["AnnounceParams", "VirtioNetAnnounce", "migration_done", "announce_self",
           "GUEST_ANNOUNCED", "SENT_RARP", "UNSUPPORTED"]
