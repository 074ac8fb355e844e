"""Benchmarks: torch_cs231n's ops against torch's on a fixed shape suite (see harness.py)."""
