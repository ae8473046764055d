"""Small Triton device functions shared by the SSM kernels."""

import triton
import triton.language as tl


@triton.jit
def softplus(x):
    """torch's softplus (linear above 20), with log1p accuracy for very negative x."""
    u = tl.exp(x)
    w = 1.0 + u
    return tl.where(x > 20.0, x, tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0))))
