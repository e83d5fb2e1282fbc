"""The one place that opens a function for every command: `sim` or a PCI address.

    fn = open_function("0000:3b:00.2")                 # VFIO (hal.vfio)
    fn = open_function("sim")                          # a simulated IFCVF in a world of its own
    fn = open_function("sim", world=w, index=1, config=IfcvfConfig(queue_pairs=2))

A simulated function is a ``hal.sim.SimFunction`` over a ``sim.ifcvf.IfcvfFunction``
named ``vf{index}`` with HAL address ``sim:{index}``; ``fn.model`` and
``fn.world`` reach the model and its world.  Functions that share a world
share one clock (``world``; without one, a new ``World(seed)``).  The options
after DEVICE describe a simulated function and are not used for a real one.

Errors are ``FunctionError`` (a HAL error, so whoever handles those handles
this): a DEVICE that is neither; ``hal.vfio.VfioError`` and
``hal.sysfs.SysfsError`` from opening a real one; ``MissingExtra`` when the
simulator is not installed.
"""
from __future__ import annotations

from hal.api import HalError, PciFunction
from hal.sysfs import SysfsError, normalize_bdf
from ifcvf.tools.extras import require

SIM = "sim"


class FunctionError(HalError):
    """DEVICE names no function we can open; the message says what is expected."""


def is_sim(device: str) -> bool:
    """``sim`` (or ``sim:N``) names a simulated IFCVF; anything else is a PCI address."""
    return device == SIM or device.startswith(SIM + ":")


def open_function(device: str, *, world=None, config=None, index: int = 0, seed: int = 0,
                  engine_factory=None) -> PciFunction:
    """Open DEVICE: ``sim`` / ``sim:N`` (a simulated IFCVF) or a PCI address bound to vfio-pci."""
    device = device.strip()
    if is_sim(device):
        return _open_sim(world=world, config=config, index=index, seed=seed,
                         engine_factory=engine_factory)
    try:
        normalize_bdf(device)
    except SysfsError:
        raise FunctionError(f"device {device!r} is neither `sim` (a simulated IFCVF) nor a PCI "
                            f"address (DDDD:BB:SS.F, e.g. 0000:3b:00.2, bound to vfio-pci)") from None
    from hal.vfio import VfioFunction
    return VfioFunction(device)


def _open_sim(*, world, config, index: int, seed: int, engine_factory):
    require("sim", "a simulated IFCVF (`--device sim`)")
    from hal.sim import SimFunction
    from sim.config import IfcvfConfig
    from sim.ifcvf import IfcvfFunction
    from sim.world import World

    if index < 0:
        raise FunctionError(f"a simulated function's index is >= 0, not {index}")
    if world is None:
        world = World(seed)
    kwargs = {"engine_factory": engine_factory} if engine_factory is not None else {}
    model = IfcvfFunction(world, config or IfcvfConfig(), name=f"vf{index}", **kwargs)
    return SimFunction(model, index)
