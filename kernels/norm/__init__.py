"""Residual add + RMSNorm (kernels/norm/add_rms.py)."""
