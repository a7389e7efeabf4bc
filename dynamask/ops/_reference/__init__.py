"""Slow pure-PyTorch twins of the kernels, written independently of them; the tests compare against these."""
