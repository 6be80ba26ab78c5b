"""Shared test setup: hypothesis profiles, a per-session conversion cache, the SmolLM2 folder."""
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))  # `from helpers import ...`

settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def tinyengine_cache(tmp_path_factory):
    """Convert GGUFs into a cache under pytest's basetemp, unless the user chose a cache
    (TINYENGINE_CACHE) to reuse across runs."""
    if os.environ.get("TINYENGINE_CACHE"):
        yield Path(os.environ["TINYENGINE_CACHE"])
        return
    path = tmp_path_factory.mktemp("tinyengine-cache")
    os.environ["TINYENGINE_CACHE"] = str(path)
    yield path
    os.environ.pop("TINYENGINE_CACHE", None)


@pytest.fixture(scope="session")
def smollm2(tinyengine_cache):
    """The embedded SmolLM2-135M-Instruct, converted once per session."""
    from helpers import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices run fastest on one thread (and do not fight other processes for the cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
