"""Shared fixtures: every test that takes `device` runs on the CPU, and on CUDA when a GPU is present."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,  # a first call may JIT-compile or warm caches
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=os.environ.get("CI", "") != "",  # CI reruns are reproducible
)
settings.load_profile("default")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def full_float32_references():
    """Every test compares with torch in full float32: on CUDA, torch's default TF32 convolutions would
    be the less exact side (torch_cs231n.check.full_float32_references); the flags are restored."""
    from torch_cs231n.check import full_float32_references

    with full_float32_references():
        yield


def pytest_report_header(config):
    import torch_cs231n

    return f"torch_cs231n {torch_cs231n.build_info()}; devices {DEVICES}"
