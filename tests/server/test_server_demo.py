"""The built-in demo checkpoint: deterministic, cached, and a valid Falcon-H1 for transformers too."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from server.demo import DEMO_VERSION, build_demo_checkpoint, demo_model_dir


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = build_demo_checkpoint(tmp_path / "a", seed=0)
    b = build_demo_checkpoint(tmp_path / "b", seed=0)
    c = build_demo_checkpoint(tmp_path / "c", seed=5)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_cached_after_first_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALCON_SERVE_CACHE", str(tmp_path))
    first = demo_model_dir()
    assert first == tmp_path / DEMO_VERSION
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert demo_model_dir() == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_VERSION]  # no staging leftovers


def test_transformers_loads_it_without_missing_weights(checkpoint: Path) -> None:
    transformers = pytest.importorskip("transformers")
    _, info = transformers.FalconH1ForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_served_greedy_text_matches_transformers(server, checkpoint: Path) -> None:
    transformers = pytest.importorskip("transformers")
    prompt = [3, 120, 121, 122, 15, 200, 201]
    r = httpx.post(server.url + "/v1/completions",
                   json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).json()
    model = transformers.FalconH1ForCausalLM.from_pretrained(checkpoint)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):  # plain greedy, no early stop at eos (like ignore_eos)
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert r["choices"][0]["text"] == server.state.engine.tokenizer.decode(ids[0, len(prompt):].tolist())
