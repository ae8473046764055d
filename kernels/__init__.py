"""Kernels: each file holds a torch reference (the definition, and the CPU path) and its Triton kernel.

Slot indices below 0 (PAD_SLOT) mark padded rows (CUDA-graph batches): kernels skip them.
"""

PAD_SLOT = -1
