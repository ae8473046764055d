"""The sampler's transformations against direct computations, and its draws against their distribution."""

import math

import pytest
import torch

from engine.sampler import apply_penalties, filter_top_k_top_p_min_p, sample
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

V = 12


def seq(prompt, outputs, generator=None, **params):
    s = Sequence("r", 0, prompt, SamplingParams(**params), generator)
    s.token_ids += outputs
    return s


def test_penalties_match_their_definition():
    torch.manual_seed(0)
    logits = torch.randn(2, V) * 3
    seqs = [seq([1, 2], [3, 3, 4], presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5),
            seq([5], [6])]  # no penalties: untouched
    out = logits.clone()
    apply_penalties(out, seqs)
    expected = logits[0].clone()
    for t in (1, 2, 3, 4):  # seen in prompt or output
        expected[t] = expected[t] / 1.5 if expected[t] > 0 else expected[t] * 1.5
    counts = {3: 2, 4: 1}
    for t, c in counts.items():
        expected[t] -= 0.25 * c + 0.5
    assert torch.allclose(out[0], expected) and torch.equal(out[1], logits[1])


def test_logit_bias_and_greedy_argmax():
    logits = torch.zeros(1, V)
    logits[0, 3] = 5.0
    result = sample(logits, [seq([1], [], temperature=0, logit_bias={7: 10.0})], eos_token_ids={2})
    assert result.token_ids == [7]
    result = sample(logits, [seq([1], [], temperature=0)], eos_token_ids={2})
    assert result.token_ids == [3]


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 2], logits[0, 9], logits[0, 4] = 9.0, 8.0, 1.0
    s = seq([1], [5], temperature=0, min_tokens=3, stop_token_ids=[9])
    assert sample(logits, [s], eos_token_ids={2}).token_ids == [4]


def test_filters_match_direct_computation():
    torch.manual_seed(1)
    logits = torch.randn(3, V)
    top_k, top_p, min_p = torch.tensor([3, 0, 0]), torch.tensor([1.0, 0.6, 1.0]), torch.tensor([0.0, 0.0, 0.3])
    out = filter_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    kept = [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in out]
    assert kept[0] == set(logits[0].topk(3).indices.tolist())
    probs = logits[1].softmax(-1)
    order = probs.argsort(descending=True).tolist()
    nucleus, mass = set(), 0.0
    for t in order:  # smallest prefix of the sorted tokens whose mass reaches 0.6
        nucleus.add(t)
        mass += probs[t].item()
        if mass >= 0.6:
            break
    assert kept[1] == nucleus
    probs = logits[2].softmax(-1)
    assert kept[2] == set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_draws_follow_the_filtered_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = dict(temperature=0.7, top_k=4)
    expected = (logits[0, :4] / 0.7).softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, [seq([1], [], generator=g, **params)], set()).token_ids[0] for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=6).float() / len(draws)
    assert freq[4:].sum() == 0
    assert torch.allclose(freq[:4], expected, atol=0.03)


def test_seeded_row_ignores_its_batch_mates():
    torch.manual_seed(2)
    logits = torch.randn(4, V)

    def draw(rows):
        seqs = [seq([1], [], torch.Generator().manual_seed(42) if i == 0 else None, temperature=1.0)
                for i in range(len(rows))]
        return sample(logits[rows], seqs, set()).token_ids[0]

    assert len({draw([0]), draw([0, 1]), draw([0, 1, 2, 3]), draw([0, 3])}) == 1


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    result = sample(logits, [seq([1], [], temperature=0, logprobs=2, logit_bias={0: 50.0})], set())
    raw = logits[0].log_softmax(-1)
    assert result.token_ids == [0]
    assert result.logprobs[0] == pytest.approx({2: raw[2].item(), 1: raw[1].item(), 0: raw[0].item()})
    assert math.isclose(sum(math.exp(v) for v in result.logprobs[0].values()), raw.exp()[[0, 1, 2]].sum().item(),
                        rel_tol=1e-5)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(n=0), dict(max_tokens=0),
                                 dict(logprobs=21), dict(repetition_penalty=0), dict(stop=[""]),
                                 dict(logit_bias={1: 101})])
def test_out_of_range_params_raise(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
