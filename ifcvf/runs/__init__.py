"""Scenario runners behind `ifcvf sim run`: one module per scenario kind.

They live in the driver package because they drive the driver; the world they
run it in comes from ``sim``.
"""
