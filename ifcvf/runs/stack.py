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

    def add_vf(self, config: IfcvfConfig | None = None, devargs: str = "vdpa=1", *,
               engine_factory=None) -> Vf:
        index = len(self.vfs)
        kwargs = {"engine_factory": engine_factory} if engine_factory else {}
        model = IfcvfFunction(self.world, config or IfcvfConfig(), name=f"vf{index}", **kwargs)
        fn = SimFunction(model, index)
        vf = Vf(model, fn, VdpaDevice(fn, parse(devargs)))
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
