"""LoRA adapters made by peft (random, nonzero lora_B) on the tiny Falcon-H1 (muP multipliers far from 1) and
FalconMamba checkpoints, served by the offline API in fp32 on the CPU: greedy tokens equal transformers+peft
and logprobs agree within 1e-4, alone and mixed in one batch with base rows and other adapters; adapters
evicted from the device and host caches and reloaded give the same outputs; bad adapters are refused."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from engine import LLM, LoRARequest, SamplingParams
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.lora import LoRAError, LoRAModulePath
from tests.lora_adapters import H1_TARGETS, MAMBA_TARGETS, build_adapter, peft_greedy
from tests.tiny_models import GPU_TEST_MEMORY

PROMPTS = [[5, 40, 70, 100, 33, 8, 90, 120, 77, 66, 10, 11, 12, 13, 200, 150, 44], [7, 250, 3]]
MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=1)

# (target set, r, lora_alpha, use_rslora)
H1_CASES = [("attention", 8, 16, False), ("mlp", 4, 4, True), ("mamba", 16, 32, False), ("all", 8, 8, True),
            ("some_slices", 2, 6, False)]
MAMBA_CASES = [("in_x_dt", 4, 8, False), ("all", 8, 16, True)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, h1_dir, mamba_dir):
    """Adapter directories by (model, target set)."""
    root = tmp_path_factory.mktemp("lora")
    built = {}
    for seed, (name, r, alpha, rslora) in enumerate(H1_CASES):
        built["h1", name] = build_adapter(h1_dir, root / f"h1-{name}", H1_TARGETS[name], r, alpha, rslora, seed)
    for seed, (name, r, alpha, rslora) in enumerate(MAMBA_CASES):
        built["mamba", name] = build_adapter(mamba_dir, root / f"mamba-{name}", MAMBA_TARGETS[name], r, alpha,
                                             rslora, seed + 10)
    return built


@pytest.fixture(scope="module")
def h1_llm(h1_dir):
    return LLM(str(h1_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=4, max_lora_rank=16)


def lora(name: str, path, lora_id: int) -> LoRARequest:
    return LoRARequest(name, lora_id, str(path))


def logprobs_of(completion) -> list[float]:
    return [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]


def check_against_peft(base_dir, adapter_dir, outputs) -> None:
    for prompt, out in zip(PROMPTS, outputs):
        tokens, logprobs = peft_greedy(base_dir, adapter_dir, prompt, MAX_TOKENS)
        assert out.outputs[0].token_ids == tokens, f"prompt {prompt}"
        assert logprobs_of(out.outputs[0]) == pytest.approx(logprobs, abs=1e-4)


H1_IDS = {name: i + 1 for i, (name, *_) in enumerate(H1_CASES)}


@pytest.mark.parametrize("case", H1_CASES, ids=[c[0] for c in H1_CASES])
def test_falcon_h1_adapter_matches_peft(h1_llm, h1_dir, adapters, case):
    name = case[0]
    outputs = h1_llm.generate(PROMPTS, GREEDY, lora_request=lora(name, adapters["h1", name], H1_IDS[name]))
    check_against_peft(h1_dir, adapters["h1", name], outputs)
    base = h1_llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in base] != [o.outputs[0].token_ids for o in outputs]  # it does act


@pytest.mark.parametrize("case", MAMBA_CASES, ids=[c[0] for c in MAMBA_CASES])
def test_falcon_mamba_adapter_matches_peft(mamba_dir, adapters, case):
    llm = LLM(str(mamba_dir), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8)
    outputs = llm.generate(PROMPTS, GREEDY, lora_request=lora(case[0], adapters["mamba", case[0]], 1))
    check_against_peft(mamba_dir, adapters["mamba", case[0]], outputs)


MIX = ["attention", "mamba", "all"]


def mixed_requests(adapters) -> tuple[list[list[int]], list[LoRARequest | None]]:
    """Base rows and three adapters, interleaved, each prompt twice."""
    prompts, loras = [], []
    for prompt in PROMPTS:
        for name in [None, *MIX]:
            prompts.append(prompt)
            loras.append(lora(name, adapters["h1", name], H1_IDS[name]) if name else None)
    return prompts, loras


def solo_outputs(llm, prompts, loras):
    return [llm.generate([p], GREEDY, lora_request=r)[0].outputs[0] for p, r in zip(prompts, loras)]


def test_mixed_batch_gives_each_request_its_solo_output(h1_llm, h1_dir, adapters):
    prompts, loras = mixed_requests(adapters)
    mixed = [o.outputs[0] for o in h1_llm.generate(prompts, GREEDY, lora_request=loras)]
    solo = solo_outputs(h1_llm, prompts, loras)
    for prompt, request, m, s in zip(prompts, loras, mixed, solo):
        assert m.token_ids == s.token_ids
        assert logprobs_of(m) == pytest.approx(logprobs_of(s), abs=1e-5)
        tokens, _ = peft_greedy(h1_dir, adapters["h1", request.lora_name] if request else None, prompt, MAX_TOKENS)
        assert m.token_ids == tokens
    assert h1_llm.engine.lora.refs == [0] * 4  # every slot reference is returned


def test_eviction_and_reload_keep_outputs(h1_dir, h1_llm, adapters):
    """One device slot and one host copy for three adapters (chunked prefill, n=2 forks too): requests wait
    for the slot, adapters are evicted and read again from disk, and outputs stay the same."""
    prompts, loras = mixed_requests(adapters)
    expected = [o.token_ids for o in solo_outputs(h1_llm, prompts, loras)]
    small = LLM(str(h1_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=1,
                max_lora_rank=16, max_num_batched_tokens=5, kv_block_size=4)
    for _ in range(2):
        outputs = small.generate(prompts, GREEDY, lora_request=loras)
        assert [o.outputs[0].token_ids for o in outputs] == expected
    # three adapters through one slot, twice: 3 loads, then 2 at least (the slot may still hold the next one)
    assert small.engine.lora.num_loads >= 5 and len(small.engine.lora.host) == 1
    pair = small.generate([PROMPTS[0]], SamplingParams(n=2, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                          lora_request=loras[1])[0]
    assert [c.token_ids for c in pair.outputs] == [expected[1]] * 2
    assert small.engine.lora.refs == [0]


def test_prefix_cache_is_keyed_by_adapter(h1_llm, h1_dir, adapters):
    prompt = list(range(20, 60))  # several KV blocks
    request = lora("all", adapters["h1", "all"], H1_IDS["all"])
    base = [h1_llm.generate([prompt], GREEDY)[0] for _ in range(3)]  # the second checkpoints the shared prefix
    assert base[2].num_cached_tokens == 32
    runs = [h1_llm.generate([prompt], GREEDY, lora_request=request)[0] for _ in range(3)]
    assert [r.num_cached_tokens for r in runs] == [0, 0, 32]  # the base model's prefix is not the adapter's
    tokens, _ = peft_greedy(h1_dir, adapters["h1", "all"], prompt, MAX_TOKENS)
    assert all(r.outputs[0].token_ids == tokens for r in runs)
    assert base[0].outputs[0].token_ids != tokens


def test_rank_over_max_lora_rank_is_refused(h1_llm, h1_dir, tmp_path):
    big = build_adapter(h1_dir, tmp_path / "big", ["q_proj"], r=32, alpha=32)
    with pytest.raises(LoRAError, match="rank 32 .* --max-lora-rank 16"):
        h1_llm.generate(PROMPTS, GREEDY, lora_request=lora("big", big, 100))
    with pytest.raises(LoRAError, match="--max-lora-rank 16"):  # at start-up
        LLMEngine(EngineArgs(model=str(h1_dir), device="cpu", dtype="float32", enable_lora=True,
                             lora_modules=[LoRAModulePath("big", str(big))]))


def _edited(adapter, tmp_path, **changes):
    directory = tmp_path / "edited"
    shutil.copytree(adapter, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("changes,message", [
    (dict(bias="all"), "bias 'all' is not supported"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(use_dora=True), "DoRA"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(target_modules=["o_proj"]), "target_modules does not name it"),
])
def test_unsupported_adapter_options_are_refused(h1_llm, adapters, tmp_path, changes, message):
    directory = _edited(adapters["h1", "attention"], tmp_path, **changes)
    with pytest.raises(LoRAError, match=message):
        h1_llm.engine.add_lora(lora("edited", directory, 200))
    assert "edited" not in h1_llm.engine.lora.names


def test_bin_only_adapter_and_reused_id_are_refused(h1_llm, adapters, tmp_path):
    directory = _edited(adapters["h1", "mlp"], tmp_path)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(LoRAError, match="safe_serialization"):
        h1_llm.engine.add_lora(lora("bin", directory, 300))
    h1_llm.engine.add_lora(lora("attention", adapters["h1", "attention"], H1_IDS["attention"]))
    with pytest.raises(LoRAError, match="already adapter 'attention'"):
        h1_llm.engine.add_lora(lora("other", adapters["h1", "mlp"], H1_IDS["attention"]))


def test_adapter_without_enable_lora_is_refused(h1_dir, adapters):
    llm = LLM(str(h1_dir), device="cpu", dtype="float32")
    with pytest.raises(LoRAError, match="enable_lora"):
        llm.generate(PROMPTS, GREEDY, lora_request=lora("mlp", adapters["h1", "mlp"], 1))


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cuda_mixed_adapters_match_peft(h1_dir, adapters, enforce_eager):
    """On the GPU (Triton kernels; decode steps replayed from CUDA graphs captured before any adapter was
    loaded), a mixed batch gives transformers+peft's greedy tokens, with adapters evicted between runs."""
    llm = LLM(str(h1_dir), device="cuda", dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16,
              max_num_seqs=8, enforce_eager=enforce_eager, gpu_memory_utilization=GPU_TEST_MEMORY)
    assert (llm.engine.runner.graphs is None) == enforce_eager
    prompts, loras = mixed_requests(adapters)
    for _ in range(2):
        outputs = llm.generate(prompts, GREEDY, lora_request=loras)
        for prompt, request, out in zip(prompts, loras, outputs):
            tokens, _ = peft_greedy(h1_dir, adapters["h1", request.lora_name] if request else None, prompt,
                                    MAX_TOKENS)
            assert out.outputs[0].token_ids == tokens


def test_requests_wait_for_an_adapter_slot_without_blocking_others(h1_dir, adapters):
    engine = LLMEngine(EngineArgs(model=str(h1_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=1,
                                  max_cpu_loras=2))  # both in host memory: only the slot is waited for
    first, second = (engine.add_lora(lora(n, adapters["h1", n], i + 1)) for i, n in enumerate(["mlp", "attention"]))
    for request_id, lora_id in [("a", first), ("b", second), ("base", None)]:
        engine.enqueue(request_id, PROMPTS[0], GREEDY, lora_id)
    engine.step()
    status = {r: engine.sequences[r][0].status.value for r in ("a", "b", "base")}
    assert status == {"a": "running", "b": "waiting", "base": "running"}  # b waits for a's slot, base does not
    while engine.has_unfinished():
        engine.step()
    assert engine.lora.refs == [0] and engine.scheduler.num_waiting_requests == 0


def test_adapter_read_back_from_disk_does_not_hold_up_other_requests(h1_dir, adapters):
    """An adapter that fell out of host memory is read again on a background thread: while the read is held
    back, the base request runs to the end; once the read ends, the adapter's request gives peft's tokens."""
    engine = LLMEngine(EngineArgs(model=str(h1_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=1,
                                  max_cpu_loras=1))
    mlp = engine.add_lora(lora("mlp", adapters["h1", "mlp"], 1))
    engine.add_lora(lora("attention", adapters["h1", "attention"], 2))  # pushes "mlp" out of host memory
    manager, read_may_finish = engine.lora, threading.Event()
    real_read = manager._read

    def held_read(request):
        assert read_may_finish.wait(timeout=60)
        return real_read(request)

    manager._read = held_read
    engine.enqueue("a", PROMPTS[0], GREEDY, mlp)
    engine.enqueue("base", PROMPTS[1], GREEDY, None)
    base = []
    while not base:
        base = [o for o in engine.step() if o.request_id == "base" and o.request_finished]
        assert engine.sequences["a"][0].status.value == "waiting"
    read_may_finish.set()
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    tokens = [t for o in outputs if o.request_id == "a" for t in o.new_token_ids]
    assert tokens == peft_greedy(h1_dir, adapters["h1", "mlp"], PROMPTS[0], MAX_TOKENS)[0]
    assert engine.lora.refs == [0]


def test_adapter_that_no_longer_loads_fails_its_request_only(h1_dir, adapters, tmp_path):
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=1)
    gone = shutil.copytree(adapters["h1", "mlp"], tmp_path / "gone")
    llm.engine.add_lora(lora("gone", gone, 1))
    llm.engine.add_lora(lora("attention", adapters["h1", "attention"], 2))  # pushes "gone" out of host memory
    shutil.rmtree(gone)
    outputs = llm.generate(PROMPTS, GREEDY, lora_request=[lora("gone", gone, 1), None])
    assert outputs[0].outputs[0].finish_reason == "error" and outputs[0].outputs[0].token_ids == []
    assert outputs[1].outputs[0].token_ids == peft_greedy(h1_dir, None, PROMPTS[1], MAX_TOKENS)[0]
    again = llm.generate(PROMPTS[:1], GREEDY, lora_request=lora("attention", adapters["h1", "attention"], 2))
    assert again[0].outputs[0].token_ids == peft_greedy(h1_dir, adapters["h1", "attention"], PROMPTS[0], MAX_TOKENS)[0]


@pytest.mark.parametrize("wrapper", ["stacked", "shrink_and_expand"])
def test_triton_kernels_in_the_model_match_peft(h1_dir, adapters, monkeypatch, wrapper):
    """The same mixed batch with the Triton kernels (Triton's interpreter on the CPU) in place of the torch
    references inside every wrapped projection: the GPU code path's math, checked on the CPU. Both wrappers:
    the A stacked under a plain base weight, and the two-kernel path that quantized bases take."""
    from engine import ops
    from engine.lora import layers
    from kernels import lora as lora_kernels

    def triton_delta(x, out, a_stack, b_stack, slice_starts, widest, rows):
        h = lora_kernels.lora_shrink(x, a_stack, rows)
        return lora_kernels.lora_expand(h, b_stack, slice_starts, widest, rows, out)

    def triton_expand(h_all, out, b_stack, slice_starts, widest, rows):
        return lora_kernels.lora_expand(h_all.unsqueeze(0), b_stack, slice_starts, widest, rows, out,
                                        slot_stride=h_all.shape[1] // b_stack.shape[0])

    calls = []
    monkeypatch.setattr(ops, "lora_delta", lambda *a: calls.append("delta") or triton_delta(*a))
    monkeypatch.setattr(ops, "lora_expand", lambda *a: calls.append("expand") or triton_expand(*a))
    if wrapper == "shrink_and_expand":
        monkeypatch.setattr(layers, "StackedLoRALinear", layers.LoRALinear)
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=3, max_lora_rank=16)
    loras = [None] + [lora(name, adapters["h1", name], H1_IDS[name]) for name in MIX]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=1)
    for request, out in zip(loras, llm.generate([PROMPTS[0]] * 4, params, lora_request=loras)):
        tokens, logprobs = peft_greedy(h1_dir, adapters["h1", request.lora_name] if request else None, PROMPTS[0], 3)
        assert out.outputs[0].token_ids == tokens
        assert logprobs_of(out.outputs[0]) == pytest.approx(logprobs, abs=1e-4)
    assert set(calls) == {"expand" if wrapper == "stacked" else "delta"}
