"""Whether a sequence is done after its newest token, and the detokenized text that goes with it."""

from __future__ import annotations

from engine.sequence import Sequence


def add_text(seq: Sequence, skip_newest: bool = False) -> None:
    """Detokenizes the output tokens whose text is not in seq.unemitted_text yet (the engine may leave a
    sequence's text a step behind its tokens: see LLMEngine.step); with skip_newest, all but the newest."""
    end = seq.num_output_tokens - 1 if skip_newest else seq.num_output_tokens
    start = seq.num_detokenized_tokens
    for token in seq.token_ids[seq.num_prompt_tokens + start: seq.num_prompt_tokens + end]:
        seq.unemitted_text += seq.detokenizer.add(token)
    seq.num_detokenized_tokens = max(start, end)


def _end_without_text(seq: Sequence) -> None:
    """An eos or stop token: the text before it, none for it."""
    add_text(seq, skip_newest=True)
    seq.num_detokenized_tokens = seq.num_output_tokens


def check_stop(seq: Sequence, token: int, eos_token_ids: set[int], max_model_len: int) -> str | None:
    """Returns the finish reason ("stop" | "length") after seq's newest token, or None.

    The eos token and stop token ids end the sequence without adding text; a stop string ends it with
    the text cut before the string (unless include_stop_str_in_output), matched across token boundaries.
    Only a sequence with stop strings (or one that ends) has its text detokenized here; the others' text
    can wait until it is reported.
    """
    params = seq.params
    past_min = seq.num_output_tokens >= params.min_tokens  # the new token counts
    if past_min and not params.ignore_eos and token in eos_token_ids:
        _end_without_text(seq)
        seq.stop_reason = None
        return "stop"
    if past_min and token in params.stop_token_set:
        _end_without_text(seq)
        seq.stop_reason = token
        return "stop"
    if params.stop_strings:
        add_text(seq, skip_newest=True)
        previous_len = len(seq.unemitted_text)
        add_text(seq)
        if past_min:
            # Only a match that ends in the new text is new; search from where it could start. Reporting
            # holds back the last (longest stop - 1) characters, so all of them are still unemitted.
            start = max(0, previous_len - max(map(len, params.stop_strings)) + 1)
            hits = [(seq.unemitted_text.find(s, start), s) for s in params.stop_strings]
            hits = [(pos, s) for pos, s in hits if pos >= 0]
            if hits:
                pos, stop = min(hits)
                cut = pos + len(stop) if params.include_stop_str_in_output else pos
                seq.unemitted_text = seq.unemitted_text[:cut]
                seq.stop_reason = stop
                return "stop"
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len
    if seq.num_output_tokens >= max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None
