"""Differentiable low-level ops, each with a pure-PyTorch reference and fused kernels."""
