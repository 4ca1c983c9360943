"""Fused kernels with a plain-PyTorch reference each (installed as `megaqwen.kernels`)."""
