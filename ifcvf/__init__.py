"""ifcvf: the IFCVF vDPA driver (Intel FPGA 100G virtio-compatible VF).

Kept import-free on purpose: the device model in ``sim`` may use
``ifcvf._native`` (C atomics) and ``ifcvf.vhost.protocol`` (the wire codec)
without pulling in the driver.
"""

__version__ = "0.1.0"
