import os
import sys

import pytest

# Tests run on CPU unless a GPU test asks otherwise; x64 stays off (the operator is float32).
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
  config.addinivalue_line("markers", "slow: long on CPU; deselect with -m 'not slow'")


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_executables():
  """Clear JAX's compilation caches after each test module. The suite compiles hundreds of
  programs in one process (many of them Pallas kernels in interpret mode), and every XLA:CPU
  executable kept alive holds memory mappings: by the end of the suite the process neared the
  kernel's limit of 65530 (vm.max_map_count), where compiling one more program crashed with a
  segmentation fault inside XLA (session 29: 18,000 mappings after part of test_model.py alone)."""
  yield
  import jax
  jax.clear_caches()
