"""Scenario runners behind `ifcvf sim run`: one module per scenario kind.

They drive the driver in a world that comes from ``sim``, which is why they
live in the composition layer (``ifcvf.tools``), not in the driver core.
"""
