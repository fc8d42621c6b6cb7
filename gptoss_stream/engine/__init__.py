"""The compute: the ctypes boundary to libgptoss (_lib.py), numpy wrappers of its kernels (kernels.py), the
forward pass along the residual stream (model.py), the KV cache, generation and sampling."""
