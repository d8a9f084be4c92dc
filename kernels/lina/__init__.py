"""LINA operator kernels (Pallas GPU; see pallas.py)."""
