"""Triton GPU kernels (imported lazily: only where triton is installed and a kernel runs)."""
