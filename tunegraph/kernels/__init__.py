"""Triton kernels beside their PyTorch references (later issue); empty for now."""
