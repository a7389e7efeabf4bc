"""Slow pure-PyTorch twins of the kernels, used by the tests as independent references."""
