"""Whether a sequence is done after its newest token, and the detokenized text that goes with it."""

from __future__ import annotations

from engine.sequence import Sequence


def check_stop(seq: Sequence, token: int, eos_token_ids: set[int], max_model_len: int) -> str | None:
    """Appends the token's text to seq.unemitted_text; returns the finish reason ("stop" | "length") or None.

    The eos token and stop token ids end the sequence without adding text; a stop string ends it with
    the text cut before the string (unless include_stop_str_in_output), matched across token boundaries.
    """
    params = seq.params
    past_min = seq.num_output_tokens >= params.min_tokens  # the new token counts
    if past_min and not params.ignore_eos and token in eos_token_ids:
        seq.stop_reason = None
        return "stop"
    if past_min and token in params.stop_token_set:
        seq.stop_reason = token
        return "stop"
    previous_len = len(seq.unemitted_text)
    seq.unemitted_text += seq.detokenizer.add(token)
    if past_min and params.stop_strings:
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
