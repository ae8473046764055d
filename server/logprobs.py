"""Engine logprobs (one {token id: logprob} dict per generated token) in OpenAI's two shapes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.protocol import CompletionLogprobs, TokenLogprob, TopLogprob

if TYPE_CHECKING:
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
                        text_offset: int) -> CompletionLogprobs:
    """Legacy completions shape. `text_offset` is where the first token starts in the choice's text;
    offsets advance by each token's own text, as in vLLM. The sampled token is always included in
    `top_logprobs`, so an entry may have logprobs+1 items (vLLM does the same)."""
    result = CompletionLogprobs()
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
