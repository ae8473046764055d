"""What the GPTQ kernels share: a code read out of its word as an exact fp32 number (2^23 + q, no int -> float
conversion: kernels/quant_linear/__init__.py), and the input channels act-order weights read.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)  # fp32 bits of 2^23: ORing an integer below 2^23 into it gives 2^23 + that integer
TWO_23 = tl.constexpr(8388608.0)


@triton.jit
def _code(words, high, J: tl.constexpr, BITS: tl.constexpr, IN_PLACE: tl.constexpr):
    """(2^23 + q 2^P in fp32, exact; 2^P) for code J of every word. IN_PLACE: the code stays where it is in its
    half of the word (high: the words shifted down by 16), P its position there; else it is shifted down, P = 0."""
    HALF: tl.constexpr = 16 // BITS
    if IN_PLACE:
        P: tl.constexpr = BITS * (J % HALF)
        src = words if J < HALF else high
        codes = (src & (((1 << BITS) - 1) << P)) | MAGIC
    else:
        P: tl.constexpr = 0
        codes = ((words >> (BITS * J)) & ((1 << BITS) - 1)) | MAGIC
    return codes.to(tl.float32, bitcast=True), 1.0 * (1 << P)


@triton.jit
def _input_channels(perm_ptr, k, K, HAS_PERM: tl.constexpr):
    """The columns of x that channels k read: perm[k] for act-order weights."""
    if HAS_PERM:
        k = tl.load(perm_ptr + k, mask=k < K, other=0)
    return k
