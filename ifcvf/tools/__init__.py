"""The composition layer: the ``ifcvf`` command and everything that runs the
driver against a function, real or simulated.

This is the only code that sees both the driver (``ifcvf`` core, ``hal``) and
the simulator (``sim``):

- ``cli``          the ``ifcvf`` command (``python -m ifcvf`` too);
- ``functions``    the one place that opens a function: ``sim`` or a PCI address;
- ``extras``       which optional extra a command needs, and saying so when it is missing;
- ``commands/``    one module per sub-command (serve, sim, conformance, bench, devices);
- ``runs/``        scenario runners behind ``ifcvf sim run``;
- ``benchmarks/``  ``ifcvf bench ...``;
- ``conformance/`` the conformance suite behind ``ifcvf conformance``.

The driver core never imports this package (tests/unit/test_layering.py).
"""
