"""A simulated host: VFs (model -> HAL -> driver), a vhost-user server, front-ends.

The whole stack of a real deployment in one process and one world: the QEMU
role (``sim.frontend``) talks real vhost-user over a socketpair to our
back-end, whose driver programs the simulated VF through the HAL.  No
threads: the front-end pumps the server after each message.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from hal.sim import SimFunction
from ifcvf.devargs import parse
from ifcvf.tools.functions import SIM, open_function
from ifcvf.vdpa import VdpaDevice
from ifcvf.vhost.backend import VhostBackend
from ifcvf.vhost.server import VhostServer
from sim.config import IfcvfConfig
from sim.frontend import QEMU_7_2, FrontEnd
from sim.ifcvf import IfcvfFunction
from sim.world import World


@dataclass
class Vf:
    model: IfcvfFunction
    fn: SimFunction
    driver: VdpaDevice
    backend: VhostBackend | None = None


class SimHost:
    def __init__(self, world: World | None = None, *, seed: int = 1):
        self.world = world or World(seed)
        self.server = VhostServer()
        self.vfs: list[Vf] = []
        self.frontends: list[FrontEnd] = []
        self.vms: list["Vm"] = []

    def add_vf(self, config: IfcvfConfig | None = None, devargs: str = "vdpa=1", *,
               engine_factory=None) -> Vf:
        fn = open_function(SIM, world=self.world, config=config, index=len(self.vfs),
                           engine_factory=engine_factory)
        vf = Vf(fn.model, fn, VdpaDevice(fn, parse(devargs)))
        self.vfs.append(vf)
        return vf

    def pump(self) -> None:
        self.server.poll_once(0)

    def connect(self, vf: Vf, *, style: str = QEMU_7_2, status: bool = True,
                name: str | None = None) -> FrontEnd:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        vf.backend = VhostBackend(vf.driver, name=name or vf.model.name, status_feature=status)
        self.server.add_connection(theirs, vf.backend)
        fe = FrontEnd(ours, pump=self.pump, style=style, use_status=status, name=f"qemu-{vf.model.name}")
        self.frontends.append(fe)
        return fe

    def close(self) -> None:
        for fe in self.frontends:
            fe.close()
        self.pump()
        self.server.close()
        for vf in self.vfs:
            vf.driver.close()
        # Guest RAM goes last: stopping the VFs above still runs the world,
        # and the guests' C code writes into their RAM while it does.
        for vm in self.vms:
            vm.close()


class Vm:
    """A guest (``sim.guest.GuestNet``) in its own RAM, plugged into a VF through vhost-user.

    ``plug`` does what QEMU does when the guest's driver comes up: connect,
    negotiate, hand over guest RAM and the guest's rings, and wire the guest's
    kicks and interrupts to the front-end's eventfds.  Traffic endpoints sit on
    a tester port cabled to the VF (``cable``).
    """

    def __init__(self, host: SimHost, *, pairs: int = 1, queue_size: int = 256, ram_mib: int = 0,
                 name: str = "vm", **guest_kw):
        from hal.memory import HostMemory
        from sim.guest import plan_layout

        self.host = host
        self.pairs = pairs
        self.queue_size = queue_size
        self.name = name
        guest_kw.setdefault("rx_buffer_size", 2048)
        guest_kw.setdefault("tx_buffer_size", 2048)
        self.guest_kw = guest_kw
        _, end = plan_layout(pairs, queue_size, rx_buffer_size=guest_kw["rx_buffer_size"],
                             tx_buffer_size=guest_kw["tx_buffer_size"],
                             tx_chain=guest_kw.get("tx_chain", "single"),
                             tx_flows=guest_kw.get("tx_flows", 1))
        self.layout_end = end
        size = max(ram_mib << 20, ((end >> 20) + 2) << 20)
        self.ram = HostMemory(size, f"{name}-ram")
        self.guest = None
        self.fe: FrontEnd | None = None
        self.features = 0
        self.rings = []
        host.vms.append(self)

    def plug(self, vf: Vf, *, style: str = QEMU_7_2, status: bool = True, wanted: int | None = None,
             enabled_pairs: int | None = None) -> FrontEnd:
        from sim.frontend import RingAddresses
        from sim.guest import GuestNet, negotiate
        from sim.migration import regions_of

        fe = self.host.connect(vf, style=style, status=status, name=f"{self.name}@{vf.model.name}")
        fe.connect(2 * self.pairs)
        features = negotiate(fe.features) if wanted is None else negotiate(fe.features, wanted)
        self.features = features
        self.guest = GuestNet(self.host.world, self.ram, features=features, queue_pairs=self.pairs,
                              queue_size=self.queue_size, name=self.name, **self.guest_kw)
        self.rings = [RingAddresses(q, self.queue_size, *self.guest.queue_addresses(q))
                      for q in range(2 * self.pairs)]
        fe.start(features | 1 << 30, regions_of(self.ram), self.rings, enabled_pairs=enabled_pairs)
        self.attach(fe)
        return fe

    def attach(self, fe: FrontEnd) -> None:
        self.fe = fe
        for q in range(2 * self.pairs):
            self.guest.attach(q, fe.kick_fds[q], fe.call_fds[q])

    def close(self) -> None:
        """Release the RAM; only once nothing runs the world any more (SimHost.close)."""
        if self.guest is not None:
            self.guest.pause()
            self.guest.detach()
        self.ram.close()


def cable(world, vf: Vf, *, gbps: float | None = None):
    """A tester port cabled to the VF's port, its RX steered by flow over the VF's pairs."""
    from sim.wire import Port, connect

    tester = Port(world, f"tester-{vf.model.name}", gbps or vf.model.config.wire_gbps)
    connect(vf.model.port, tester)
    return tester

