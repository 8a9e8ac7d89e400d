import importlib.util

import pytest

# Every engine-level test runs once per backend: the same tests, not a copy.
BACKENDS = [b for b in ("torch", "mlx") if importlib.util.find_spec(f"fermi.backends.{b}") is not None]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param
