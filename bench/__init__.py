"""Benchmarks: minitensor against TensorFlow and PyTorch on the seed's U-Nets (python -m bench)."""
