"""Hardware abstraction layer: a PCI function as the driver sees it.

``hal.api`` is the contract; ``hal.sim`` binds it to the simulated IFCVF in
``sim``; ``hal.vfio`` binds it to a real function through VFIO.
"""
