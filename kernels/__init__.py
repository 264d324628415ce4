"""Packed low-bit weight formats and Triton dequantize-matmul kernels (installed as ``ptqbench.kernels``)."""
