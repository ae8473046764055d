"""Triton paged_attention against its torch reference (the K/V write is tested with RoPE, tests/kernels/test_rope.py).

CPU: Triton's interpreter at small shapes. It mishandles bfloat16 (tl.dot multiplies the raw bits, fp32 -> bf16
truncates), so the half-precision path is tested there in float16; bfloat16 runs on the GPU. GPU: Falcon-H1
0.5B / 7B / 34B attention shapes in bf16 and fp32, and decode under CUDA-graph capture and replay.
Tolerances (max |out - ref| / max |ref|): fp32 < 1e-3 (the kernels use IEEE fp32 dots, no tf32), fp16 / bf16
< 1e-2.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import attention  # noqa: E402
from kernels.attention import decode, prefill  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}



def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def make_batch(seqs: list[tuple[int, int]], num_decodes: int, q_heads: int, kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, seed: int) -> dict:
    """A flat batch of sequences (n_new, seq_len), decodes first, over random caches and a shuffled block pool.

    Every cache slot holds random K/V (the new tokens' rows included, as if already written); unused block-table
    columns are -1, so a kernel that reads past a sequence's blocks faults or goes wrong.
    """
    gen = torch.Generator().manual_seed(seed)
    needed = [cdiv(seq_len, block_size) for _, seq_len in seqs]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(seqs), max(needed) + 2), -1, dtype=torch.int32)
    used = 0
    for b, count in enumerate(needed):
        tables[b, :count] = order[used: used + count].int()
        used += count
    new = torch.tensor([n for n, _ in seqs])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.long), new.cumsum(0)]).int()
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    batch = dict(
        q=torch.randn(int(new.sum()), q_heads, head_dim, generator=gen).to(dtype),
        k_cache=torch.randn(cache_shape, generator=gen).to(dtype),
        v_cache=torch.randn(cache_shape, generator=gen).to(dtype),
        query_start_loc=query_start_loc,
        seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32),
        block_tables=tables,
    )
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    batch.update(scale=head_dim**-0.5, num_decodes=num_decodes, max_query_len=int(new.max()),
                 max_seq_len=max(s for _, s in seqs))
    return batch


def slot_mapping(batch: dict, seqs: list[tuple[int, int]], block_size: int) -> torch.Tensor:
    """Flat cache slot of every new token (block * block_size + offset)."""
    tables = batch["block_tables"].cpu()
    slots = []
    for b, (n_new, seq_len) in enumerate(seqs):
        pos = torch.arange(seq_len - n_new, seq_len)
        slots.append(tables[b, pos // block_size].long() * block_size + pos % block_size)
    return torch.cat(slots).to(DEVICE)


def check_attention(batch: dict) -> None:
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["query_start_loc"], batch["seq_lens"],
            batch["block_tables"], batch["scale"], batch["num_decodes"], batch["max_query_len"], batch["max_seq_len"])
    out = attention.paged_attention(*args)
    ref = attention.paged_attention_ref(*args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < TOL[out.dtype], err


# Layouts (n_new, seq_len), decodes first. Covers a padding row (seq_len 0), length-1 sequences, sequences
# shorter than a block, longer than several blocks and longer than one 64-token decode tile, first prefill
# chunks, chunks continuing cached tokens, a one-token chunk and chunks longer than one query block.
CPU_LAYOUTS = {
    "decode": ([(1, 1), (1, 3), (1, 0), (1, 4), (1, 37), (1, 150)], 6),
    "decode_long": ([(1, 300)], 1),
    "prefill": ([(5, 5), (1, 1), (13, 40), (70, 70)], 0),
    "mixed": ([(1, 9), (1, 0), (1, 130), (3, 3), (1, 17), (20, 61), (9, 9)], 3),
    "long_chunk": ([(1, 66), (140, 200)], 1),
}


@pytest.mark.parametrize("layout", list(CPU_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_attention_layouts(layout: str, dtype: torch.dtype):
    seqs, num_decodes = CPU_LAYOUTS[layout]
    check_attention(make_batch(seqs, num_decodes, 6, 2, 24, 4, dtype, seed=len(layout)))


@pytest.mark.parametrize("q_heads,kv_heads,head_dim,block_size", [(8, 2, 64, 16), (4, 1, 32, 8), (10, 2, 16, 4)])
def test_paged_attention_head_shapes(q_heads: int, kv_heads: int, head_dim: int, block_size: int):
    seqs, num_decodes = CPU_LAYOUTS["mixed"]
    check_attention(make_batch(seqs, num_decodes, q_heads, kv_heads, head_dim, block_size, torch.float32,
                               seed=head_dim))


@pytest.mark.parametrize("programs_per_sm,block_n,chunk", [(1, 64, 32), (64, 16, 8)])
def test_decode_split_counts(monkeypatch, programs_per_sm: int, block_n: int, chunk: int):
    """One split per sequence, and many (23 splits of 48 tokens for the longest, reduced 8 at a time)."""
    monkeypatch.setattr(decode, "DECODE_PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(decode, "DECODE_BLOCK_N", block_n)
    monkeypatch.setattr(decode, "DECODE_MIN_PARTITION", block_n)
    monkeypatch.setattr(decode, "DECODE_SPLIT_CHUNK", chunk)
    seqs = [(1, 1100), (1, 0), (1, 65), (1, 5)]
    check_attention(make_batch(seqs, 4, 6, 2, 24, 4, torch.float32, seed=programs_per_sm))


@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(6, 2, 24), (8, 2, 32), (4, 4, 16), (12, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_split_gqa_groups(monkeypatch, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """The split decode with GQA groups of 3, 4, 1 and 6 (padded to 16 query rows in the dot), splits of 16
    tokens (up to 19 for the longest), a sequence of length 0 (zeros) and ones shorter than a split."""
    monkeypatch.setattr(decode, "DECODE_PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(decode, "DECODE_BLOCK_N", 16)
    monkeypatch.setattr(decode, "DECODE_MIN_PARTITION", 16)
    batch = make_batch([(1, 300), (1, 0), (1, 33), (1, 7)], 4, q_heads, kv_heads, head_dim, 4, dtype, seed=head_dim)
    check_attention(batch)


@pytest.mark.parametrize("min_partition", [40, 64])
def test_decode_min_partition(monkeypatch, min_partition: int):
    """Each sequence splits its own context: in a launch sized for 4096 tokens (16 splits, 16-token tiles),
    contexts up to min_partition (40 rounds up to 48) run in one program that writes its output directly, longer
    ones over up to 16 splits (1100 tokens: 14 of 80) reduced; both in one launch."""
    monkeypatch.setattr(decode, "DECODE_PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(decode, "DECODE_BLOCK_N", 16)
    monkeypatch.setattr(decode, "DECODE_MIN_PARTITION", min_partition)
    seqs = [(1, 1100), (1, 48), (1, 49), (1, 0), (1, 64), (1, 65), (1, 3), (1, 700)]
    batch = make_batch(seqs, len(seqs), 6, 2, 24, 4, torch.float32, seed=min_partition)
    assert decode.decode_splits(len(seqs), 2, 4096, torch.device(DEVICE)) == 16  # 64 x 4 SMs / (8 x 2 heads)
    check_attention({**batch, "max_seq_len": 4096})


def test_decode_graph_bound_and_missing_hints():
    """max_seq_len far above the real lengths (the CUDA-graph case) and no hints at all give the same result."""
    seqs, num_decodes = CPU_LAYOUTS["mixed"]
    batch = make_batch(seqs, num_decodes, 6, 2, 24, 4, torch.float32, seed=7)
    check_attention({**batch, "max_seq_len": 4096})
    check_attention({**batch, "max_seq_len": 0, "max_query_len": 0})


def test_write_then_attend():
    """The model's sequence: write the new tokens' K/V, then attend over cached + new tokens."""
    seqs, num_decodes = [(1, 21), (1, 2), (17, 17), (6, 30)], 2
    block_size = 4
    batch = make_batch(seqs, num_decodes, 6, 2, 24, block_size, torch.float32, seed=11)
    T = batch["q"].shape[0]
    k, v = torch.randn(2, T, 2, 24, device=DEVICE)
    attention.write_kv_ref(k, v, batch["k_cache"], batch["v_cache"], slot_mapping(batch, seqs, block_size))
    check_attention(batch)


# ----------------------------------------------------------------------------------------------------------------
# The prefill reading the new tokens' K / V densely (new_k / new_v, as the model passes them), the cached ones
# through the pages.
# ----------------------------------------------------------------------------------------------------------------


def new_kv(batch: dict, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's K / V [T, Hkv, D] copied from its cache slot: k contiguous, v a view into wider rows (the
    kernel takes either; the model passes the two contiguous halves of rope_write_kv's kv_out)."""
    seqs = list(zip((batch["query_start_loc"][1:] - batch["query_start_loc"][:-1]).tolist(),
                    batch["seq_lens"].tolist()))
    slots = slot_mapping(batch, seqs, block_size)
    k = batch["k_cache"].flatten(0, 1)[slots]
    T, kv_heads, head_dim = k.shape
    rows = torch.randn(T, (kv_heads + 3) * head_dim, device=DEVICE).to(k.dtype)
    v = rows[:, 2 * head_dim: (kv_heads + 2) * head_dim].view(T, kv_heads, head_dim)
    v.copy_(batch["v_cache"].flatten(0, 1)[slots])
    return k, v


def poison_prefill_slots(batch: dict, block_size: int) -> None:
    """NaN into the cache slots of the prefill sequences' new tokens: a kernel reading them there, rather than
    from new_k / new_v, returns NaN."""
    seqs = list(zip((batch["query_start_loc"][1:] - batch["query_start_loc"][:-1]).tolist(),
                    batch["seq_lens"].tolist()))
    prefill_rows = slice(int(batch["query_start_loc"][batch["num_decodes"]]), None)
    slots = slot_mapping(batch, seqs, block_size)[prefill_rows]
    for cache in (batch["k_cache"], batch["v_cache"]):
        cache.flatten(0, 1)[slots] = float("nan")


def check_new_kv(batch: dict, block_size: int, tma_readable: bool) -> None:
    """paged_attention with new_k / new_v (the new tokens' cache slots poisoned) against the reference over the
    clean cache; tma_readable: whether new_k / new_v must be readable by TMA descriptors (if the settings ask)."""
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["query_start_loc"], batch["seq_lens"],
            batch["block_tables"], batch["scale"], batch["num_decodes"], batch["max_query_len"], batch["max_seq_len"])
    ref = attention.paged_attention_ref(*args)
    new_k, new_v = new_kv(batch, block_size)
    block_n = prefill._prefill_config(new_k.dtype, batch["max_query_len"])["BLOCK_N"]
    assert (prefill._new_kv_descriptors(new_k, new_v, block_n) is not None) == tma_readable
    poison_prefill_slots(batch, block_size)
    out = attention.paged_attention(*args, new_k=new_k, new_v=new_v)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < TOL[out.dtype], err


# (n_new, seq_len), decodes first: prompts from scratch of 1 to 3 query blocks; chunks over cached tokens whose
# count is and is not a multiple of the key tile (a partial last cached tile), shorter than one tile, and of one
# new token; varlen batches with decodes in front.
NEW_KV_LAYOUTS = {
    "new_only": ([(70, 70), (1, 1), (33, 33), (130, 130)], 0),
    "cached_new": ([(40, 104), (17, 81), (5, 13), (1, 50), (64, 192)], 0),
    "mixed": ([(1, 9), (1, 130), (70, 70), (20, 61), (3, 3), (100, 163)], 2),
}
# Tile settings of the sweep's kind (BLOCK_M a multiple of BLOCK_N), TMA descriptors on and off.
NEW_KV_CONFIGS = [(32, 16, True), (64, 64, False), (64, 32, True), (128, 128, True)]


@pytest.mark.parametrize("block_m,block_n,descriptors", NEW_KV_CONFIGS)
@pytest.mark.parametrize("layout", list(NEW_KV_LAYOUTS))
def test_prefill_new_kv_layouts(monkeypatch, layout: str, block_m: int, block_n: int, descriptors: bool):
    monkeypatch.setattr(prefill, "_prefill_config", lambda dtype, max_query_len: dict(
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2, DESCRIPTORS=descriptors))
    seqs, num_decodes = NEW_KV_LAYOUTS[layout]
    block_size = 16
    batch = make_batch(seqs, num_decodes, 6, 2, 64, block_size, torch.float16, seed=block_m + block_n)
    check_new_kv(batch, block_size, tma_readable=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(2, 2, 64), (4, 2, 128), (12, 2, 128), (12, 2, 64)])
def test_prefill_new_kv_head_shapes(monkeypatch, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """GQA groups 1, 2 and 6, head_dim 64 and 128, under the default tile settings of each dtype (fp32: pointer
    loads) and in fp16 also without descriptors."""
    seqs, num_decodes = NEW_KV_LAYOUTS["mixed"]
    block_size = 16
    batch = make_batch(seqs, num_decodes, q_heads, kv_heads, head_dim, block_size, dtype, seed=q_heads + head_dim)
    descriptors = prefill._prefill_config(dtype, batch["max_query_len"])["DESCRIPTORS"]
    check_new_kv({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}, block_size, True)
    if descriptors:
        default = prefill._prefill_config
        monkeypatch.setattr(prefill, "_prefill_config",
                            lambda dtype, max_query_len: {**default(dtype, max_query_len), "DESCRIPTORS": False})
        check_new_kv(batch, block_size, True)


def test_prefill_new_kv_fallbacks():
    """new_k / new_v that TMA cannot read (a head_dim not a power of two, a misaligned row stride) or in another
    dtype than the cache: pointer loads, or the pages, with the same result."""
    seqs, num_decodes = NEW_KV_LAYOUTS["mixed"]
    batch = make_batch(seqs, num_decodes, 6, 2, 24, 4, torch.float16, seed=3)
    check_new_kv(batch, 4, tma_readable=False)
    batch = make_batch(seqs, num_decodes, 6, 2, 64, 16, torch.float16, seed=4)
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["query_start_loc"], batch["seq_lens"],
            batch["block_tables"], batch["scale"], batch["num_decodes"], batch["max_query_len"], batch["max_seq_len"])
    ref = attention.paged_attention_ref(*args)
    new_k, new_v = new_kv(batch, 16)
    rows = torch.zeros(new_v.shape[0], 2 * 64 * 2 + 1, device=DEVICE, dtype=new_v.dtype)  # odd row stride
    odd_v = rows[:, 1: 2 * 64 + 1].view_as(new_v)
    odd_v.copy_(new_v)
    assert prefill._new_kv_descriptors(new_k, odd_v, 64) is None
    assert rel_err(attention.paged_attention(*args, new_k=new_k, new_v=odd_v), ref) < TOL[torch.float16]
    # fp32 new_k / new_v over an fp16 cache: ignored, every key read through the (unpoisoned) pages
    out = attention.paged_attention(*args, new_k=new_k.float() * 0, new_v=new_v.float() * 0)
    assert rel_err(out, ref) < TOL[torch.float16]


# ----------------------------------------------------------------------------------------------------------------
# GPU: published Falcon-H1 attention shapes (Hq, Hkv, head_dim), block size 16.
# ----------------------------------------------------------------------------------------------------------------

MODELS = {"0.5B": (8, 2, 64), "7B": (12, 2, 128), "34B": (20, 4, 128)}
GPU_SEQS = ([(1, 1), (1, 0), (1, 15), (1, 16), (1, 17), (1, 300), (1, 2049), (1, 5000),
             (1000, 4000), (517, 517), (1, 1), (64, 100), (200, 1300)], 8)


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_attention_gpu(model: str, dtype: torch.dtype):
    q_heads, kv_heads, head_dim = MODELS[model]
    seqs, num_decodes = GPU_SEQS
    check_attention(make_batch(seqs, num_decodes, q_heads, kv_heads, head_dim, 16, dtype, seed=1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_long_decode_gpu(dtype: torch.dtype):
    """One 32k-token sequence (many splits) and a batch of 64 decodes of mixed lengths."""
    check_attention(make_batch([(1, 32768)], 1, 12, 2, 128, 16, dtype, seed=2))
    lengths = torch.randint(1, 6000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    check_attention(make_batch([(1, n) for n in lengths], 64, 12, 2, 128, 16, dtype, seed=3))


@pytest.mark.gpu
def test_decode_cuda_graph():
    """Decode captured once with max_seq_len = max_model_len, replayed after the lengths and tables change."""
    q_heads, kv_heads, head_dim = MODELS["7B"]
    max_model_len, block_size = 8192, 16
    first = make_batch([(1, n) for n in (5, 0, 700, 4100, 33, 1, 8000, 16)], 8, q_heads, kv_heads, head_dim,
                       block_size, torch.bfloat16, seed=5)
    second = make_batch([(1, n) for n in (8192, 3, 0, 64, 2500, 17, 1, 999)], 8, q_heads, kv_heads, head_dim,
                        block_size, torch.bfloat16, seed=6)
    num_blocks = max(first["k_cache"].shape[0], second["k_cache"].shape[0])
    max_blocks = max(first["block_tables"].shape[1], second["block_tables"].shape[1])
    static = {
        "q": first["q"].clone(),
        "k_cache": torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16),
        "v_cache": torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16),
        "query_start_loc": first["query_start_loc"].clone(),
        "seq_lens": torch.zeros(8, dtype=torch.int32, device=DEVICE),
        "block_tables": torch.full((8, max_blocks), -1, dtype=torch.int32, device=DEVICE),
    }

    def load(batch: dict) -> None:
        for name in ("q", "seq_lens"):
            static[name].copy_(batch[name])
        for name in ("k_cache", "v_cache"):
            static[name][: batch[name].shape[0]].copy_(batch[name])
        static["block_tables"].fill_(-1)
        static["block_tables"][:, : batch["block_tables"].shape[1]].copy_(batch["block_tables"])

    def run() -> torch.Tensor:
        return attention.paged_attention(static["q"], static["k_cache"], static["v_cache"], static["query_start_loc"],
                                         static["seq_lens"], static["block_tables"], head_dim**-0.5, 8, 1,
                                         max_model_len)

    load(first)
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for batch in (first, second):
        load(batch)
        graph.replay()
        ref = attention.paged_attention_ref(static["q"], static["k_cache"], static["v_cache"],
                                            static["query_start_loc"], static["seq_lens"], static["block_tables"],
                                            head_dim**-0.5, 8, 1, max_model_len)
        assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_splits_gpu(dtype: torch.dtype):
    """7B heads, one sequence (the decode graph's case: 2 KV heads, up to 128 splits) at lengths from one token
    to 32k; then replays of one CUDA graph sized for 32k (128 splits, of which each length fills its own
    number: one for the shortest two, written directly), each equal to the eager result."""
    q_heads, kv_heads, head_dim = MODELS["7B"]
    for n in (1, 100, 2049, 8000, 32768):
        batch = make_batch([(1, n)], 1, q_heads, kv_heads, head_dim, 16, dtype, seed=n)
        check_attention(batch)
        args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["query_start_loc"], batch["seq_lens"],
                batch["block_tables"], batch["scale"], 1, 1, 32768)
        eager = attention.paged_attention(*args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attention.paged_attention(*args)
        for _ in range(5):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["0.5B", "7B"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_new_kv_gpu(model: str, dtype: torch.dtype):
    """The default tile settings (bf16: TMA descriptors, 64- and 128-row blocks by chunk length)."""
    q_heads, kv_heads, head_dim = MODELS[model]
    seqs, num_decodes = GPU_SEQS
    batch = make_batch(seqs, num_decodes, q_heads, kv_heads, head_dim, 16, dtype, seed=8)
    check_new_kv(batch, 16, tma_readable=True)
    short = make_batch([(300, 300), (1, 40), (256, 1000), (77, 77)], 0, q_heads, kv_heads, head_dim, 16, dtype, seed=9)
    check_new_kv(short, 16, tma_readable=True)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,num_warps,num_stages,descriptors",
                         [(128, 128, 8, 3, True), (128, 64, 8, 3, True), (64, 64, 4, 3, True), (128, 128, 8, 3, False)])
def test_prefill_new_kv_configs_gpu(monkeypatch, block_m: int, block_n: int, num_warps: int, num_stages: int,
                                    descriptors: bool):
    """Tile settings of the sweep at the 0.5B head shape (the sweep itself checks them at 7B's)."""
    monkeypatch.setattr(prefill, "_prefill_config", lambda dtype, max_query_len: dict(
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, DESCRIPTORS=descriptors))
    q_heads, kv_heads, head_dim = MODELS["0.5B"]
    seqs, num_decodes = GPU_SEQS
    check_new_kv(make_batch(seqs, num_decodes, q_heads, kv_heads, head_dim, 16, torch.bfloat16, seed=10), 16, True)


@pytest.mark.gpu
def test_prefill_new_kv_cuda_graph():
    """A prefill (TMA descriptors over static new_k / new_v) captured once at a bucket's max_query_len, replayed
    after the lengths, tables and data change, as engine/prefill_graphs.py does."""
    q_heads, kv_heads, head_dim = MODELS["7B"]
    block_size, T, width = 16, 2048, 160
    layouts = ([(1000, 1000), (700, 2500), (300, 300)], [(2048, 2048), (0, 0), (0, 0)])
    batches = [make_batch(seqs, 0, q_heads, kv_heads, head_dim, block_size, torch.bfloat16, seed=12 + i)
               for i, seqs in enumerate(layouts)]
    num_blocks = max(b["k_cache"].shape[0] for b in batches)
    static = {
        "q": torch.zeros(T, q_heads, head_dim, device=DEVICE, dtype=torch.bfloat16),
        "k_cache": torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16),
        "v_cache": torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16),
        "query_start_loc": torch.zeros(4, dtype=torch.int32, device=DEVICE),
        "seq_lens": torch.zeros(3, dtype=torch.int32, device=DEVICE),
        "block_tables": torch.full((3, width), -1, dtype=torch.int32, device=DEVICE),
        "new_kv": torch.zeros(2, T, kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16),
    }

    def load(batch: dict) -> torch.Tensor:
        """batch into the static buffers; returns the reference output of its rows."""
        rows = batch["q"].shape[0]
        static["q"][:rows].copy_(batch["q"])
        for name in ("k_cache", "v_cache"):
            static[name][: batch[name].shape[0]].copy_(batch[name])
        for name in ("query_start_loc", "seq_lens"):
            static[name].copy_(batch[name])
        static["block_tables"].fill_(-1)
        static["block_tables"][:, : batch["block_tables"].shape[1]].copy_(batch["block_tables"])
        new_k, new_v = new_kv(batch, block_size)
        static["new_kv"][0, :rows].copy_(new_k)
        static["new_kv"][1, :rows].copy_(new_v)
        ref = attention.paged_attention_ref(static["q"], static["k_cache"], static["v_cache"],
                                            static["query_start_loc"], static["seq_lens"], static["block_tables"],
                                            head_dim**-0.5)
        poison_prefill_slots({**static, "num_decodes": 0}, block_size)
        return ref[:rows]

    def run() -> torch.Tensor:
        return attention.paged_attention(static["q"], static["k_cache"], static["v_cache"], static["query_start_loc"],
                                         static["seq_lens"], static["block_tables"], head_dim**-0.5, 0, T,
                                         width * block_size, new_k=static["new_kv"][0], new_v=static["new_kv"][1])

    load(batches[0])
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for batch in batches:
        ref = load(batch)
        graph.replay()
        rows = ref.shape[0]
        assert torch.isfinite(out[:rows]).all()
        assert rel_err(out[:rows], ref) < 1e-2


@pytest.mark.gpu
def test_prefill_rows_independent_of_cached_prefix_and_chunk_length():
    """bf16, 7B heads: a query's output is bitwise the same whether its prompt is prefilled whole (a long chunk,
    no prefix cache) or after ctx tokens served from the cache (a short chunk over cached pages, ctx on and off
    the key tile), and whether a short chunk runs alone or beside a long one (another tile config)."""
    q_heads, kv_heads, head_dim = MODELS["7B"]
    block_size, S, dtype = 16, 1200, torch.bfloat16
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    pages = S // block_size + 1
    k_cache, v_cache = (torch.randn(2 * pages, block_size, kv_heads, head_dim, device=DEVICE, generator=gen)
                        .to(dtype) for _ in range(2))
    tables = torch.arange(2 * pages, dtype=torch.int32, device=DEVICE).view(2, pages)
    q = torch.randn(S, q_heads, head_dim, device=DEVICE, generator=gen).to(dtype)
    keys = [c.view(2, pages * block_size, kv_heads, head_dim) for c in (k_cache, v_cache)]

    def prefill(chunks: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """chunks of (sequence 0 or 1 = table row, first position, seq_len): each chunk's rows of the output."""
        rows = [slice(first, seq_len) for _, first, seq_len in chunks]
        qsl = torch.tensor([0] + [r.stop - r.start for r in rows], device=DEVICE).cumsum(0).to(torch.int32)
        new_k, new_v = (torch.cat([kv[seq, r] for (seq, _, _), r in zip(chunks, rows)]) for kv in keys)
        out = attention.paged_attention(
            torch.cat([q[r] for r in rows]), k_cache, v_cache, qsl,
            torch.tensor([c[2] for c in chunks], dtype=torch.int32, device=DEVICE),
            tables[[c[0] for c in chunks]].contiguous(), head_dim**-0.5, 0, new_k=new_k, new_v=new_v)
        return [out[a:b] for a, b in zip(qsl[:-1].tolist(), qsl[1:].tolist())]

    whole = prefill([(0, 0, S)])[0]
    for ctx in (37, 64, 700, 1150):
        assert torch.equal(prefill([(0, ctx, S)])[0], whole[ctx:]), ctx
    alone = prefill([(1, 0, 100)])[0]
    assert torch.equal(prefill([(0, 0, S), (1, 0, 100)])[1], alone)
