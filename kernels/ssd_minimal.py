"""The chunked SSD scan of kernels/ssd_scan.py on one page: the same decomposition as its Triton kernels,
written as einsums over one sequence (the Mamba2 paper's "SSD minimal" form). For reading, not serving.

Per head h (group g = h // (H / G)), with a_t = dt_t * A the log-decay of token t:
    S_t = exp(a_t) S_{t-1} + dt_t x_t (outer) B_t;   y_t = S_t C_t + D x_t
Cut the sequence into chunks of Q tokens; inside a chunk let A_l = a_1 + ... + a_l (cumulative log-decay).
    1. diagonal blocks:  y_l  = sum_{s<=l} (C_l . B_s) exp(A_l - A_s) dt_s x_s       (causal, chunk-local)
    2. chunk states:     S_c  = sum_s exp(A_Q - A_s) dt_s x_s (outer) B_s           (from a zero state)
    3. state passing:    S_in(c+1) = exp(A_Q(c)) S_in(c) + S_c,  S_in(0) = the initial state
    4. off-diagonal:     y_l += exp(A_l) C_l . S_in(c)
Steps 1, 2 and 4 are matmuls over a chunk; only step 3 runs across chunks, once per chunk, not per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> [..., L, L]: out[i, j] = a_{j+1} + ... + a_i for j <= i (0 on the diagonal), -inf above
    it, so exp(out) is the causal decay from position j to position i."""
    cum = a.cumsum(-1)
    causal = torch.ones(a.shape[-1], a.shape[-1], dtype=torch.bool, device=a.device).tril()
    return (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, initial_state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, in fp32: x [T, H, P], dt [T, H] (after softplus and clamp), A, D [H], B, C [T, G, N],
    initial_state [H, P, N] -> (y [T, H, P], final state [H, P, N])."""
    T, H, P = x.shape
    pad = -T % chunk_size  # padding tokens have dt = 0: no decay, no input, outputs dropped

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [T, ...] -> [chunks, Q, ...], group dims widened to heads
        if t.dim() == 3 and t.shape[1] != H:
            t = t.repeat_interleave(H // t.shape[1], dim=1)
        return F.pad(t.float(), (0, 0) * (t.dim() - 1) + (0, pad)).view(-1, chunk_size, *t.shape[1:])

    x_c, dt_c, B_c, C_c = chunks(x), chunks(dt), chunks(B), chunks(C)  # c l h p | c l h | c l h n | c l h n
    a = (dt_c * A.float()).permute(2, 0, 1)  # [h, c, l]
    a_cum = a.cumsum(-1)

    y_diag = torch.einsum("clhn,cshn,hcls,csh,cshp->clhp", C_c, B_c, torch.exp(segsum(a)), dt_c, x_c)  # 1.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)
    chunk_states = torch.einsum("clhn,hcl,clh,clhp->chpn", B_c, decay_to_end, dt_c, x_c)  # 2.
    states = torch.cat([initial_state[None].float(), chunk_states])  # [1 + c, h, p, n]
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # [h, 1 + c, 1 + c]
    incoming = torch.einsum("hzc,chpn->zhpn", chunk_decay, states)  # 3. incoming[z]: entering chunk z
    y_off = torch.einsum("clhn,chpn,hcl->clhp", C_c, incoming[:-1], torch.exp(a_cum))  # 4.

    y = (y_diag + y_off).reshape(-1, H, P)[:T] + D.float()[:, None] * x.float()
    return y, incoming[-1]
