import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _zoo_cache(tmp_path_factory):
    """Zoo models are generated once per machine into the user cache (outside the repo);
    KRYPTON_CACHE redirects it when set by the caller."""
    yield


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
