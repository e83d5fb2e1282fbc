"""The VFs one `ifcvf serve` process serves: added at start and at run time, removed at run time.

``Daemon`` owns the vhost-user server (one event loop), the simulated world
that every simulated VF of the process shares, and one ``ServedVf`` per
socket.  ``add`` and ``remove`` touch their own VF only; the control socket
(``ifcvf.tools.control``) and the metrics endpoint read through ``list`` and
``stats``.  Everything here runs on the loop's thread.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ifcvf.tools.extras import require

log = logging.getLogger("ifcvf.serve")


class AddError(Exception):
    """A VF could not be added; the message says why (nothing was left behind)."""


@dataclass
class ServedVf:
    path: str
    device: str
    devargs: str
    driver: object                 # ifcvf.vdpa.VdpaDevice
    model: object | None = None    # sim.ifcvf.IfcvfFunction, on `sim`
    wire: object | None = None     # sim.udpwire.UdpWire
    endpoint: object | None = None
    backends: list = field(default_factory=list)

    @property
    def backend(self):
        conn = self.endpoint.conn if self.endpoint is not None else None
        return conn.backend if conn is not None else None


class Daemon:
    def __init__(self, *, client: bool = False, status_feature: bool = True):
        from ifcvf.vhost.server import VhostServer

        self.server = VhostServer()
        self.client = client
        self.status_feature = status_feature
        self.vfs: dict[str, ServedVf] = {}
        self.world = None        # every simulated VF of this process shares one world
        self.clock = None        # sim.realtime.RealtimeClock once there is a world
        self._sim_index = 0      # model names vf0, vf1, ... never reused

    # --- the loop -----------------------------------------------------------------
    def timeout(self) -> float:
        """How long a round of the loop may wait: short while a simulated world follows the wall clock."""
        return 0.001 if self.clock is not None else 1.0

    def after(self) -> None:
        if self.clock is not None:
            self.clock.sync()

    def serve_forever(self) -> None:
        self.server.serve_forever(timeout=self.timeout, after=self.after)

    # --- VFs ----------------------------------------------------------------------
    def add(self, path: str, device: str, devargs: str = "vdpa=1", wire: str | None = None) -> ServedVf:
        """Open DEVICE, probe it and serve it on PATH.  AddError (with nothing left open) when
        any step fails."""
        from hal.api import HalError
        from ifcvf.devargs import DevargsError, parse
        from ifcvf.tools.extras import MissingExtra
        from ifcvf.tools.functions import is_sim, open_function
        from ifcvf.vdpa import ProbeError, VdpaDevice
        from ifcvf.vhost.backend import VhostBackend

        if path in self.vfs:
            raise AddError(f"{path} is already served (by {self.vfs[path].device})")
        try:
            parsed = parse(devargs)
        except DevargsError as err:
            raise AddError(f"{device}: {err}") from None
        wire_ports = None
        if wire is not None:
            if not is_sim(device):
                raise AddError(f"--wire connects a simulated VF's port; {device} has a real one")
            try:
                require("sim", "--wire (a simulated VF's port)")
            except MissingExtra as err:
                raise AddError(str(err)) from None
            from sim.udpwire import WireSpecError, parse_wire
            try:
                wire_ports = parse_wire(wire)
            except WireSpecError as err:
                raise AddError(str(err)) from None
        fn = driver = link = None
        try:
            try:
                fn = open_function(device, world=self.world, index=self._sim_index)
            except MissingExtra as err:
                raise AddError(str(err)) from None
            model = None
            if is_sim(device):
                from sim.steering import install
                model = fn.model
                self._sim_index += 1
                # Multiqueue RX as a virtio-net device without RSS does it: by
                # the pair each flow last transmitted on (sim/steering.py).
                install(model)
                if self.world is None:
                    from sim.realtime import RealtimeClock
                    self.world = fn.world
                    self.clock = RealtimeClock(self.world)
            if wire_ports is not None:
                from sim.udpwire import UdpWire
                link = UdpWire(model.world, model.port, *wire_ports, name=f"{model.name}.udp")
                log.warning("%s (%s): wire %s", device, model.name, link.describe())
            driver = VdpaDevice(fn, parsed)
            vf = ServedVf(path, device, devargs, driver, model, link)
            vf.endpoint = self.server.add_endpoint(path, lambda: VhostBackend(
                driver, name=path, status_feature=self.status_feature), client=self.client)
        except (DevargsError, ProbeError, HalError, OSError, AddError) as err:
            self._undo(fn, driver, link)
            raise AddError(f"{device}: {err}") from None
        except BaseException:
            self._undo(fn, driver, link)
            raise
        self.vfs[path] = vf
        log.warning("serving %s on %s (%s)", device, path, driver.kind)
        return vf

    @staticmethod
    def _undo(fn, driver, link) -> None:
        for what, close in (("wire", link and link.close), ("driver", driver and driver.close),
                            ("function", None if driver else fn and fn.close)):
            if close:
                try:
                    close()
                except Exception:
                    log.error("undoing a failed add: closing the %s failed", what, exc_info=True)

    def remove(self, path: str) -> None:
        """Stop serving PATH: its front-end is disconnected and its VF stopped and closed.
        KeyError if it is not served."""
        vf = self.vfs.pop(path)
        self._log_counters(vf)
        _cleanup(f"removing {path}", self.server.remove_endpoint, path)
        _cleanup(f"closing {vf.driver.name}", vf.driver.close)
        if vf.wire is not None:
            _cleanup(f"closing {vf.wire.name}", vf.wire.close)
        log.warning("no longer serving %s on %s", vf.device, path)

    def close(self) -> None:
        for vf in self.vfs.values():
            _cleanup(f"{vf.path}: stats", self._log_counters, vf)
        # Each step on its own: one that fails must not leave the VFs after it running.
        _cleanup("closing the vhost-user server", self.server.close)
        for vf in self.vfs.values():
            _cleanup(f"closing {vf.driver.name}", vf.driver.close)
            if vf.wire is not None:
                _cleanup(f"closing {vf.wire.name}", vf.wire.close)
        self.vfs.clear()

    # --- what the control socket and the metrics read ------------------------------
    def describe(self, vf: ServedVf) -> dict:
        driver = vf.driver
        backend = vf.backend
        run = driver.running
        features = run.setup.features if run is not None else (backend.features if backend else 0)
        return {"socket": vf.path, "device": vf.device, "devargs": vf.devargs, "kind": driver.kind,
                "state": driver.mode, "connected": backend is not None,
                "features": f"{features:#x}", "queue_pairs": driver.max_queue_pairs,
                "queues": driver.running_vrings(),
                "wire": vf.wire.describe() if vf.wire is not None else None}

    def list(self) -> list[dict]:
        return [self.describe(vf) for vf in self.vfs.values()]

    def stats(self, vf: ServedVf):
        """The VF's ``ifcvf.stats.VfStats``, with the model's counters on `sim`."""
        device = None
        if vf.model is not None:
            from ifcvf.tools.modelstats import device_counters
            device = device_counters(vf.model)
        return vf.driver.stats(device)

    def _log_counters(self, vf: ServedVf) -> None:
        # What the VF did, for whoever reads the log.
        log.info("%s: stats: %s", vf.path, self.stats(vf).summary())
        if vf.model is not None:
            # The model's own counters as it keeps them (the peer tests read this line).
            stats = vf.model.datapath.stats()
            stats["queues"] = {q: c for q, c in stats["queues"].items() if c["rounds"] or c["dropped"]}
            errors = vf.model.errors
            log.info("%s: stats %s%s", vf.model.name, stats, f", errors {errors}" if errors else "")
        if vf.wire is not None:
            log.info("%s: %s", vf.wire.name, vf.wire.counters())


def _cleanup(what: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        log.error("%s failed", what, exc_info=True)
