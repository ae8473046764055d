"""Engine logprobs (one {token id: logprob} dict per generated token) in OpenAI's two shapes, and prompt
logprobs (engine.outputs.Logprob entries) as echoed completions logprobs and as vLLM's `prompt_logprobs`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.protocol import CompletionLogprobs, PromptLogprob, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from engine.outputs import PromptLogprobs
    from engine.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    # One token alone, special tokens shown (vLLM does the same); a partial UTF-8 byte reads as U+FFFD.
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(logprobs: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda item: item[1], reverse=True)[:k]


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                  top_k: int) -> list[TokenLogprob]:
    """`choices[].logprobs.content`: the sampled token and the `top_k` most likely ones at each step."""

    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = token_text(tokenizer, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for token_id, dist in zip(token_ids, logprobs, strict=True):
        sampled = entry(token_id, dist[token_id])
        content.append(TokenLogprob(**sampled.model_dump(), top_logprobs=[entry(t, lp) for t, lp in _top(dist, top_k)]))
    return content


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                        text_offset: int, after: CompletionLogprobs | None = None) -> CompletionLogprobs:
    """Legacy completions shape. `text_offset` is where the first token starts in the choice's text;
    offsets advance by each token's own text, as in vLLM. The sampled token is always included in
    `top_logprobs`, so an entry may have logprobs+1 items (vLLM does the same). Appended to `after`
    (the echoed prompt's part) if given."""
    result = after or CompletionLogprobs()
    for token_id, dist in zip(token_ids, logprobs, strict=True):
        text = token_text(tokenizer, token_id)
        result.tokens.append(text)
        result.token_logprobs.append(dist[token_id])
        top: dict[str, float] = {}
        for t, lp in _top(dist, len(dist)):
            top.setdefault(token_text(tokenizer, t), lp)  # ids that read alike (e.g. U+FFFD): keep the likeliest
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result


def echoed_prompt_logprobs(tokenizer: Tokenizer, prompt_ids: list[int], prompt_logprobs: PromptLogprobs,
                           top_k: int) -> tuple[CompletionLogprobs, int]:
    """The prompt's part of echoed completions logprobs, offsets from 0: the first token has no context, so
    its logprob and top_logprobs are None (as OpenAI and vLLM send them); the others carry the actual
    token and the `top_k` most likely ones. Also returns the text offset just past the prompt."""
    result = CompletionLogprobs()
    text_offset = 0
    for token_id, entry in zip(prompt_ids, prompt_logprobs, strict=True):
        text = token_text(tokenizer, token_id)
        result.tokens.append(text)
        result.text_offset.append(text_offset)
        text_offset += len(text)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(entry[token_id].logprob)
        top: dict[str, float] = {}
        for t, lp in sorted(entry.items(), key=lambda item: item[1].rank):
            if t == token_id or lp.rank <= top_k:
                top.setdefault(token_text(tokenizer, t), lp.logprob)
        result.top_logprobs.append(top)
    return result, text_offset


def vllm_prompt_logprobs(tokenizer: Tokenizer, prompt_ids: list[int], prompt_logprobs: PromptLogprobs,
                         top_k: int) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs` response field: per prompt token None (the first) or {token id: logprob,
    rank, decoded_token} for the actual token and the `top_k` most likely ones."""
    return [None if entry is None else
            {str(t): PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=token_text(tokenizer, t))
             for t, lp in entry.items() if t == token_id or lp.rank <= top_k}
            for token_id, entry in zip(prompt_ids, prompt_logprobs, strict=True)]
