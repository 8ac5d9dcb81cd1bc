"""Triton kernels, each beside the plain-torch reference it must match."""
