"""The simulated world: a cycle-level IFCVF model on simpy and everything around it.

Independent hardware written from the register reference: nothing here imports
the driver.  The model's C is its own native module, ``sim._native`` (built
from csrc/sim/); the only thing used from the ``ifcvf`` package is the
vhost-user wire codec (``ifcvf.vhost.protocol``), which the QEMU role needs;
tests/unit/test_layering.py enforces that.
"""
