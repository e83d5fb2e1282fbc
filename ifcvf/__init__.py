"""ifcvf: the IFCVF vDPA driver (Intel FPGA 100G virtio-compatible VF).

Kept import-free on purpose: the device model in ``sim`` may use
``ifcvf.vhost.protocol`` (the wire codec) without pulling in the driver.  The
driver's C is ``ifcvf._native`` (csrc/driver/); the simulator has its own,
``sim._native`` (csrc/sim/).
"""

__version__ = "0.1.0"
