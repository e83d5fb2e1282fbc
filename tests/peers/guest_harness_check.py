"""Runs INSIDE the test guest for test_guest_harness.py: exercises the harness, not the driver.

    python guest_harness_check.py RESULTS_DIR FRAMES

Writes a file into the shared results directory, brings the NIC up with the
kernel's own virtio-net driver, announces READY on the console, waits until
the host's FRAMES frames have been received, then fails on purpose so the
host can check that a guest traceback reaches it.
"""
import glob
import os
import subprocess
import sys
import time

results, frames = sys.argv[1], int(sys.argv[2])
with open(os.path.join(results, "from-guest.txt"), "w") as f:
    f.write(f"written in the guest, kernel {os.uname().release}\n")

subprocess.run(["modprobe", "virtio_net"], check=True)
ifaces = glob.glob("/sys/bus/pci/devices/*/virtio*/net/*")
assert len(ifaces) == 1, ifaces
iface = os.path.basename(ifaces[0])
subprocess.run(["ip", "link", "set", "dev", iface, "up"], check=True)
counter = f"/sys/class/net/{iface}/statistics/rx_packets"
print(f"GUEST-READY {iface}", flush=True)

deadline = time.monotonic() + 60
received = 0
while time.monotonic() < deadline:
    received = int(open(counter).read())
    if received >= frames:
        break
    time.sleep(0.05)  # polling a kernel counter: there is no event to wait on
print(f"GUEST-RECEIVED {received}", flush=True)


class DeliberateFailure(Exception):
    pass


raise DeliberateFailure("the harness must show this traceback on the host")
