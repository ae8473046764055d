"""Cost of constrained decoding: decode tok/s with every sequence constrained by a JSON schema vs
unconstrained, at 1 and 32 sequences, and time to first token for a first-seen schema (compiled on
admission) vs a cached one vs none. Random weights with a published shape; the tokenizer is a
synthetic byte-level one with the model's full vocabulary (the token mask's cost grows with it).

    python benchmarks/structured.py --model falcon-h1-7b --out structured.md     # on the GPU
    python benchmarks/structured.py --tiny                                       # a quick run on the CPU

The schema is an array of at least 10,000 records, so no sequence completes its grammar (and stops)
while it is timed; the matcher does real JSON work at every step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from benchmarks.offline import SHAPES
from benchmarks.report import emit
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutputsParams
from engine.tokenizer import SPECIAL_TOKENS, _bytes_to_unicode

TINY = dict(SHAPES["falcon-h1-0.5b"], vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_d_ssm=128, mamba_n_heads=8,
            mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=32, max_position_embeddings=4096,
            torch_dtype="float32")


def record_schema(name: str = "record") -> dict:
    record = {"type": "object", "additionalProperties": False, "required": ["id", name, "status", "tags"],
              "properties": {"id": {"type": "integer", "minimum": 0}, name: {"type": "string", "maxLength": 32},
                             "status": {"enum": ["active", "pending", "closed"]}, "score": {"type": "number"},
                             "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
                             "owner": {"type": "object", "additionalProperties": False, "required": ["email"],
                                       "properties": {"email": {"type": "string", "format": "email"},
                                                      "verified": {"type": "boolean"}}}}}
    return {"type": "array", "items": record, "minItems": 10000}


def synthetic_tokenizer_files(directory: Path, vocab_size: int) -> None:
    """tokenizer.json of a byte-level BPE with vocab_size tokens: specials, the 256 bytes, then words,
    word pieces with a leading space, digit runs, punctuation pairs and JSON fragments. No merges: the
    benchmark feeds token ids; only the token strings matter to the grammar."""
    byte_char = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[byte_char[b]] = len(vocab)

    def visible(text: str) -> str:
        return "".join(byte_char[b] for b in text.encode())

    letters = "etaoinshrdlucmfwypvbgkqjxz"
    pieces = itertools.chain(
        ('"' + p for p in (':', ',', '}', ']', ': ', ', ', '},', '}]', ': "', '", "')),
        (a + b for a in "{}[]\":, " for b in "{}[]\":, "),
        (str(i) for i in range(1000)),
        (prefix + "".join(w) for n in range(2, 8) for w in itertools.product(letters[:6 + 2 * n], repeat=n)
         for prefix in ("", " ", "_")),
    )
    for piece in pieces:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(visible(piece), len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": SPECIAL_TOKENS[2]}))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_tok_s(engine: LLMEngine, n: int, steps: int, structured: StructuredOutputsParams | None
                 ) -> tuple[float, float]:
    """tok/s of n sequences over `steps` decode steps, and the seconds per step spent filling masks."""
    params = SamplingParams(max_tokens=steps + 8, temperature=1.0, ignore_eos=True, structured_outputs=structured)
    gen = torch.Generator().manual_seed(n)
    ids = [f"b{n}-{structured is not None}-{i}" for i in range(n)]
    for request_id in ids:
        engine.add_request(request_id, torch.randint(300, 4000, (128,), generator=gen).tolist(), params)
    seqs = [engine.sequences[r][0] for r in ids]
    while not all(s.num_output_tokens >= 1 for s in seqs):
        engine.step()
    fill, filling = engine.grammars.fill_bitmask, [0.0]

    def timed_fill(matchers):
        t = time.perf_counter()
        out = fill(matchers)
        filling[0] += time.perf_counter() - t
        return out

    engine.grammars.fill_bitmask = timed_fill
    sync(engine.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.device)
    elapsed = time.perf_counter() - start
    engine.grammars.fill_bitmask = fill
    assert all(not s.is_finished for s in seqs), "a sequence finished while timed"
    for request_id in ids:
        engine.abort(request_id)
    return n * steps / elapsed, filling[0] / steps


def time_to_first_token(engine: LLMEngine, structured: StructuredOutputsParams | None, tag: str) -> float:
    params = SamplingParams(max_tokens=1, temperature=1.0, structured_outputs=structured)
    prompt = list(range(300, 428))
    sync(engine.device)
    start = time.perf_counter()
    engine.add_request(tag, prompt, params)  # compiles the grammar (the server does it in a worker thread)
    while engine.has_unfinished():
        engine.step()
    sync(engine.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="falcon-h1-7b", choices=[m for m in SHAPES if "h1" in m])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the script)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else SHAPES[args.model]
    device = "cpu" if args.tiny else "cuda"
    steps = min(args.steps, 8) if args.tiny else args.steps
    with tempfile.TemporaryDirectory() as root:
        directory = Path(root) / "model"
        synthetic_tokenizer_files(directory, shape["vocab_size"])
        (directory / "config.json").write_text(json.dumps(shape))
        engine = LLMEngine(EngineArgs(model=str(directory), device=device, dtype="float32" if args.tiny else "bfloat16",
                                      load_format="dummy", max_model_len=1024, max_num_seqs=max(args.batch_sizes),
                                      gpu_memory_utilization=0.9, enable_prefix_caching=False))  # TTFT: no hits
        name = "tiny (CPU)" if args.tiny else args.model
        schema = StructuredOutputsParams(json=record_schema())
        decode_tok_s(engine, 1, 2, schema)  # warm up kernels and the grammar cache
        rows = []
        for n in args.batch_sizes:
            free, _ = decode_tok_s(engine, n, steps, None)
            constrained, fill_s = decode_tok_s(engine, n, steps, schema)
            rows.append((name, f"decode, {n} seq", f"{free:,.0f} tok/s", f"{constrained:,.0f} tok/s",
                         f"{constrained / free - 1:+.1%} (mask fill {fill_s * 1e3:.2f} ms/step)"))
        plain = time_to_first_token(engine, None, "ttft-plain")
        first = time_to_first_token(engine, StructuredOutputsParams(json=record_schema("fresh")), "ttft-new")
        cached = time_to_first_token(engine, StructuredOutputsParams(json=record_schema("fresh")), "ttft-cached")
        rows.append((name, "TTFT, 128-token prompt", f"{plain * 1e3:,.1f} ms",
                     f"first-seen schema {first * 1e3:,.1f} ms, cached {cached * 1e3:,.1f} ms",
                     f"{first / plain - 1:+.0%} / {cached / plain - 1:+.0%}"))
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [f"device: {device_name}, torch {torch.__version__}, vocabulary {shape['vocab_size']:,} tokens", "",
             "| model | measurement | unconstrained | JSON schema | change |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
