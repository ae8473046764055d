"""lm-eval against a live server, in-process through lm_eval.simple_evaluate with the recipe of
server/README.md: `local-completions` with a local tokenizer on a multiple-choice task shipped in
tests/lm_eval (no downloads) gives transformers' loglikelihoods item by item, and
`local-completions` / `local-chat-completions` generate what the endpoints generate."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.server.conftest import MODEL_NAME
from tests.tiny_models import reference_prompt_logprobs

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline_repo_root(monkeypatch):
    """The task files name their data relative to the repository root; nothing may be downloaded."""
    monkeypatch.chdir(REPO_ROOT)
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def evaluate(lm, task: str, **kwargs) -> list[dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path="tests/lm_eval"),
                              log_samples=True, **kwargs)
    return results["samples"][task]


def test_local_completions_loglikelihoods_match_transformers(server, checkpoint, offline_repo_root) -> None:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(model=MODEL_NAME, base_url=server.url + "/v1/completions", tokenizer=str(checkpoint))
    samples = evaluate(lm, "falcon_tiny_mc")
    assert len(samples) == 4
    for sample in samples:
        assert len(sample["arguments"]) == len(sample["doc"]["choices"])
        for (context, continuation), (loglikelihood, is_greedy) in zip(sample["arguments"], sample["filtered_resps"]):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)  # lm-eval's own tokenization
            ids = context_ids + continuation_ids
            dist = reference_prompt_logprobs(checkpoint, ids)
            scores = [dist[len(context_ids) + j - 1, t] for j, t in enumerate(continuation_ids)]
            assert loglikelihood == pytest.approx(float(sum(scores)), abs=1e-4)
            assert is_greedy == all(dist[len(context_ids) + j - 1].argmax() == t
                                    for j, t in enumerate(continuation_ids))


def test_local_chat_completions_generation(server, client: openai.OpenAI, offline_repo_root) -> None:
    from lm_eval.models.openai_completions import LocalChatCompletion

    lm = LocalChatCompletion(model=MODEL_NAME, base_url=server.url + "/v1/chat/completions")
    samples = evaluate(lm, "falcon_tiny_gen", apply_chat_template=True)
    assert len(samples) == 3
    for sample in samples:
        direct = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": sample["doc"]["question"]}], max_tokens=8,
            temperature=0, stop=["\n\n"])
        assert sample["filtered_resps"][0] == direct.choices[0].message.content


def test_local_completions_generation(server, checkpoint, client: openai.OpenAI, offline_repo_root) -> None:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(model=MODEL_NAME, base_url=server.url + "/v1/completions", tokenizer=str(checkpoint),
                             max_gen_toks=8)
    samples = evaluate(lm, "falcon_tiny_gen")
    assert len(samples) == 3
    for sample in samples:
        prompt_ids = lm.tok_encode(sample["arguments"][0][0])  # lm-eval sends its own token ids
        direct = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=8, temperature=0,
                                           stop=["\n\n"])
        assert sample["filtered_resps"][0] == direct.choices[0].text
