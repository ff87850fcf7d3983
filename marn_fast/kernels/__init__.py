"""Triton kernels (imported lazily by marn_fast.ops; nothing here is imported with the package)."""
