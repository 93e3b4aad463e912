"""Prometheus collectors and the pure straggler / memory-balance analysis."""
