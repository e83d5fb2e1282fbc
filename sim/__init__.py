"""The simulated world: a cycle-level IFCVF model on simpy and everything around it.

Independent hardware written from the register reference: nothing here imports
the driver.  The only things used from the ``ifcvf`` package are its C atomics
(``ifcvf._native``) and the vhost-user wire codec (``ifcvf.vhost.protocol``),
which the QEMU role needs; tests/unit/test_layering.py enforces that.
"""
