"""The conformance suite: what the driver needs of a function, checked on any backend.

``suite.py`` holds the tests (pytest), ``rings.py`` a minimal split ring to
exercise queues; ``ifcvf.tools.commands.conformance`` is the `ifcvf
conformance` command.  The suite lives in the package, not only in tests/, so
users can run it on their hardware from an installed copy.
"""
