import os
import sys

# Tests run on CPU unless a GPU test asks otherwise; x64 stays off (the operator is float32).
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
  config.addinivalue_line("markers", "slow: long on CPU; deselect with -m 'not slow'")
