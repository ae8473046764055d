"""Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the previous kernel
in the stream still runs, so its launch latency and prologue hide behind that kernel's tail.

The rule every kernel here that takes USE_PDL follows, and what makes it safe:
  - before `wait_for_predecessor`, a program reads only what no kernel of the step writes (weights and
    norm weights as stored, not a tensor a torch op of the step made) and writes nothing;
  - every program calls it, before any early return.
griddepcontrol.wait blocks until the preceding grid has completed and its writes are visible; it waits on
that grid only. But no program of that grid could finish before its own wait returned, i.e. before the grid
before it completed, and so on down the chain: by induction a kernel past its wait sees every earlier
kernel complete, two or more launches back included. So no dependent's write can race a predecessor's read
of the same buffer (residual stream, state slots, KV cache, split-K counters and partials, reused pool
memory) and no read sees a stale value. Kernels launched without PDL (torch ops; cuBLAS, unless it sets
the attribute itself, and then its kernels wait likewise) start after the full completion of the previous
kernel as usual, and a PDL kernel after one of them waits for its completion.

`wait_for_predecessor` also lets the next kernel launch (griddepcontrol.launch_dependents): the next grid is
scheduled once every program of this one has issued it or exited, so only when this grid's last programs
are resident, and it cannot take SM room from them; at most two grids are in flight, since the next one
releases its own successor only after its wait returns, when this one has completed.

On when unsupported (not CUDA, capability < 9.0, Triton's interpreter, a Triton without gdc_wait or the
launch_pdl option) USE_PDL is False and nothing of it is traced: the kernels are unchanged.
FALCON_SERVE_PDL=0 turns it off (read once at import; tests and benchmarks set `ENABLED` to compare in one
process: it is read when a kernel is launched, so when a CUDA graph is captured for graphed steps).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # older Triton: never traced, USE_PDL is always False there
    _HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


ENABLED = os.environ.get("FALCON_SERVE_PDL", "1") != "0"


def _triton_launches_pdl() -> bool:
    """Whether Triton's CUDA backend takes the launch_pdl option (the launch attribute)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


@functools.lru_cache
def supported(device: torch.device) -> bool:
    """Whether kernels on this device can be launched with PDL (ENABLED aside)."""
    return (device.type == "cuda" and _HAS_GDC and os.environ.get("TRITON_INTERPRET") != "1"
            and _triton_launches_pdl() and torch.cuda.get_device_capability(device) >= (9, 0))


def enabled(device: torch.device) -> bool:
    return ENABLED and supported(device)


def launch_kwargs(device: torch.device) -> dict:
    """The launch keywords of a kernel with a USE_PDL constexpr: the flag, and Triton's launch_pdl when on."""
    return dict(USE_PDL=True, launch_pdl=True) if enabled(device) else dict(USE_PDL=False)


@triton.jit
def wait_for_predecessor(USE_PDL: tl.constexpr):
    """The previous kernel complete (and so every earlier one: module docstring); then the next kernel may
    launch. Every program calls it before its first read of activations or state and before any store."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
