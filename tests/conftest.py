"""Shared fixtures: the repo on sys.path, a loader of the bench/ scripts, and one local Ray for the whole
test session."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))


def pytest_configure(config):
    config.addinivalue_line("markers", "torch_internals: tests the torch solvers of sparsemax.py, not the "
                            "numba kernels (run once, on the torch path)")


@pytest.fixture
def load_bench():
    """``load_bench("bench_engine")``: the module of ``bench/bench_engine.py`` (bench/ is not a package)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO_DIR / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def no_work(monkeypatch):
    """For tests of refused arguments: starting or joining Ray, running trials, or whatever else the test hands
    to ``no_work(module, name)`` (a script's data loader) fails the test; Ray's state must not change."""
    import ray

    import training

    def refuse(*args, **kwargs):
        raise AssertionError("work started for arguments that should have been refused")

    def forbid(*targets: tuple) -> None:
        for module, name in targets:
            monkeypatch.setattr(module, name, refuse)

    forbid((training, "init_ray"), (training, "run_trials"), (ray, "init"))
    was_up = ray.is_initialized()
    yield forbid
    assert ray.is_initialized() == was_up


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray with 2 CPUs, shared by every test that runs trials (scripts reuse it)."""
    import ray

    import training

    training.init_ray(argparse.Namespace(gpus_id=None, ray_address=None, num_cpus=2))
    yield ray
    ray.shutdown()
