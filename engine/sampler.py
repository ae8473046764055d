"""Batched sampling on the device: grammar masks, logit_bias, penalties, min_tokens, temperature,
top-k/top-p/min-p, per-request seeded generators, and logprobs of the model's raw distribution (vLLM's
default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sequence import Sequence
from engine.structured_output import apply_token_bitmask


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def small_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A few host values on `device` without waiting for it: a plain copy from pageable memory
    synchronizes the stream, which would stall the host behind the forward pass in flight."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def select_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] (no copy when rows are all of x, in order), without a device sync."""
    if rows == list(range(x.shape[0])):
        return x
    return x.index_select(0, small_tensor(rows, torch.long, x.device))


class DeviceSample:
    """Sampled tokens (and logprobs) still on the device, their copy to the host under way; `result()`
    waits for it. Holding one lets the host schedule and launch the next step first."""

    def __init__(self, token_ids: torch.Tensor, logprob_rows: list[int], num_logprobs: list[int],
                 chosen: torch.Tensor | None, top_ids: torch.Tensor | None, top_values: torch.Tensor | None):
        self.token_ids = token_ids  # [S] int64 on the device: the next step's input tokens
        self.logprob_rows, self.num_logprobs = logprob_rows, num_logprobs
        device_tensors = [token_ids] + ([chosen, top_ids, top_values] if logprob_rows else [])
        if token_ids.is_cuda:
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in device_tensors]
            for host, t in zip(self._host, device_tensors):
                host.copy_(t, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host, self._copied = device_tensors, None
        self._result: SampleResult | None = None

    def result(self) -> SampleResult:
        if self._result is None:
            if self._copied is not None:
                self._copied.synchronize()
            token_list = self._host[0].tolist()
            logprobs: list[dict[int, float] | None] = [None] * len(token_list)
            if self.logprob_rows:
                chosen, top_ids, top_values = (t.tolist() for t in self._host[1:])
                for j, (i, n) in enumerate(zip(self.logprob_rows, self.num_logprobs)):
                    entry = dict(zip(top_ids[j][:n], top_values[j][:n]))
                    entry[token_list[i]] = chosen[j]
                    logprobs[i] = entry
            self._result = SampleResult(token_list, logprobs)
        return self._result


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place, for rows whose request asks for them (OpenAI's and vLLM's definitions):
    repetition: a token seen in prompt or output has its logit divided by r if > 0, else multiplied;
    frequency/presence: logit -= f * count_in_output + p * (count_in_output > 0)."""
    rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty
            or s.params.repetition_penalty != 1.0]
    if not rows:
        return
    V, device = logits.shape[1], logits.device
    counts = torch.zeros(len(rows), V, device=device)
    seen = torch.zeros(len(rows), V, dtype=torch.bool, device=device)
    for j, i in enumerate(rows):
        out = torch.tensor(seqs[i].output_token_ids, dtype=torch.long, device=device)
        counts[j].scatter_add_(0, out, torch.ones_like(out, dtype=counts.dtype))
        seen[j, torch.tensor(seqs[i].token_ids, dtype=torch.long, device=device)] = True
    params = [seqs[i].params for i in rows]
    rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    sub = logits[rows]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    logits[rows] = sub - freq * counts - pres * (counts > 0)


def filter_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                             min_p: torch.Tensor) -> torch.Tensor:
    """Sets to -inf every logit outside the row's top-k, its top-p nucleus, or under min_p * max prob."""
    V = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    probs = sorted_logits.softmax(-1)
    drop = rank >= torch.where(top_k > 0, top_k, V)[:, None]
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]  # keep tokens until the mass before them reaches p
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int],
           grammar_mask: tuple[list[int], torch.Tensor] | None = None) -> SampleResult:
    """One token per row of logits [S, V] (fp32) for seqs[row]. grammar_mask: (rows, packed bitmask of
    those rows) of the constrained sequences; their disallowed tokens are removed before anything else."""
    return sample_on_device(logits, seqs, eos_token_ids, grammar_mask).result()


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int],
                     grammar_mask: tuple[list[int], torch.Tensor] | None = None) -> DeviceSample:
    """`sample` without waiting for the device. Greedy and random rows launch without a sync; logit_bias,
    penalties, min_tokens and grammar masks still copy from pageable memory (they synchronize)."""
    S, V = logits.shape
    device = logits.device
    params = [s.params for s in seqs]
    want_logprobs = [p.logprobs is not None for p in params]
    raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None
    if grammar_mask is not None or any(p.logit_bias or p.min_tokens or p.presence_penalty or p.frequency_penalty
                                       or p.repetition_penalty != 1.0 for p in params):
        logits = logits.clone()  # the caller's logits stay as the model gave them
    if grammar_mask is not None:
        apply_token_bitmask(logits, *grammar_mask)
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=device)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=device)
    apply_penalties(logits, seqs)
    for i, (s, p) in enumerate(zip(seqs, params)):
        if s.num_output_tokens < p.min_tokens:
            banned = p.stop_token_set | (set() if p.ignore_eos else eos_token_ids)
            logits[i, [t for t in banned if t < V]] = float("-inf")

    tokens = logits.argmax(-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        sub = [params[i] for i in random_rows]
        temp = small_tensor([p.temperature for p in sub], torch.float32, device)[:, None]
        probs = filter_top_k_top_p_min_p(
            select_rows(logits, random_rows) / temp,
            small_tensor([p.top_k for p in sub], torch.long, device),
            small_tensor([p.top_p for p in sub], torch.float32, device),
            small_tensor([p.min_p for p in sub], torch.float32, device),
        ).softmax(-1)
        # argmax(p / q) with q ~ Exp(1) is a draw from p; a seeded row draws q from its own generator,
        # so its tokens do not depend on its batch mates.
        q = torch.empty_like(probs).exponential_()
        for j, i in enumerate(random_rows):
            if seqs[i].generator is not None:
                q[j].exponential_(generator=seqs[i].generator)
        drawn = (probs / q).argmax(-1)
        if len(random_rows) == S:
            tokens = drawn
        else:
            tokens.index_copy_(0, small_tensor(random_rows, torch.long, device), drawn)

    rows = [i for i in range(S) if want_logprobs[i]]
    if not rows:
        return DeviceSample(tokens, [], [], None, None, None)
    k = max(max(params[i].logprobs for i in rows), 1)
    row_logprobs = select_rows(raw_logprobs, rows)
    top = row_logprobs.topk(k, dim=-1)
    chosen = row_logprobs.gather(1, select_rows(tokens, rows)[:, None])[:, 0]
    return DeviceSample(tokens, rows, [params[i].logprobs for i in rows], chosen, top.indices, top.values)
