"""Benchmarks of owl-sparse (kernels, end to end, pruning) and the GPU suite helpers."""
