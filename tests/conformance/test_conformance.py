"""The conformance suite (ifcvf/tools/conformance/suite.py) in the test run.

The simulated VF always; a VFIO function too when IFCVF_DEVICE names one.
"""
import os

_named = os.environ.get("IFCVF_DEVICE", "")
os.environ.setdefault("IFCVF_CONFORMANCE_DEVICES", ",".join(["sim"] + ([_named] if _named else [])))

from ifcvf.tools.conformance.suite import *  # noqa: E402,F401,F403  (the tests themselves)
