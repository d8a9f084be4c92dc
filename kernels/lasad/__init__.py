"""The LASAD operator: reference (scan), chunk (XLA) and pallas (GPU) implementations."""
