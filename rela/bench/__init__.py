"""Benchmarks that ship with the package, run by ``rela bench NAME``."""
