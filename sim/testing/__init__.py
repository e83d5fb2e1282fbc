"""Test-only parts of the simulator: what tests and benchmarks use, never the model.

- ``splitring``     ``SplitRing``: a split ring as a driver sees it, a descriptor at a
                    time (builds rings, hostile ones included; reads what the device wrote);
- ``guest_testdev`` stand-ins for the device side (``RingDevice``, ``NullDevice``,
                    ``LinePort``) to test or benchmark the guest model and traffic alone;
- ``flows``         UDP/IPv4 and IPv6 test frames of a guest's flows and their answers
                    (for the receive steering, ``sim.steering``);
- ``enginebench``   the device side alone, flat out (``python -m sim.testing.enginebench``).

Nothing outside tests/, ``sim.testing`` itself and the benchmarks of
``ifcvf.tools.benchmarks`` imports this package (tests/unit/test_layering.py).
"""
