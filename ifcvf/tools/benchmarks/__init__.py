"""Benchmarks behind `ifcvf bench`; each module exposes register(subparsers)."""
