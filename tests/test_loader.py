"""Weight loading: sharded files, hub ids from the offline cache, and clear errors for bad checkpoints."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.loader import LoadError, resolve_model_path
from tests.tiny_models import build_checkpoint, falcon_h1_config, reference_greedy

PROMPT = [5, 40, 70, 100, 33]


def greedy(directory, n=4):
    llm = LLM(str(directory), device="cpu", dtype="float32")
    return llm.generate([PROMPT], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].outputs[0].token_ids


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    src = build_checkpoint(tmp_path / "single", falcon_h1_config())
    model = AutoModelForCausalLM.from_pretrained(src)
    sharded = copy_checkpoint(src, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert greedy(sharded) == reference_greedy(src, PROMPT, 4)


def test_hub_repo_id_offline_from_cache(tmp_path, h1_dir, monkeypatch):
    snapshot = tmp_path / "hub" / "models--tiiuae--tiny-h1" / "snapshots" / "0123abcd"
    shutil.copytree(h1_dir, snapshot)
    (tmp_path / "hub" / "models--tiiuae--tiny-h1" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiiuae--tiny-h1" / "refs" / "main").write_text("0123abcd")
    from huggingface_hub import constants

    # huggingface_hub reads its environment once, at import.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("tiiuae/tiny-h1") == snapshot
    assert greedy("tiiuae/tiny-h1") == reference_greedy(h1_dir, PROMPT, 4)
    with pytest.raises(LoadError, match="tiiuae/not-there"):
        resolve_model_path("tiiuae/not-there")


def edit_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mamba.A_log"), "missing tensors.*layers.1.mamba.A_log"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}), "unexpected tensors.*extra"),
    (lambda t: t.update({"model.layers.0.mamba.D": torch.zeros(5)}), r"mamba.D.*shape \(5,\).*\(8,\)"),
    # parts of a fused projection are checkpoint tensors like any other
    (lambda t: t.pop("model.layers.0.self_attn.v_proj.weight"), "missing tensors.*layers.0.self_attn.v_proj.weight"),
    (lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(3, 64)}),
     r"layers.1.self_attn.k_proj.weight.*shape \(3, 64\).*the model expects \(48, 64\)"),
    (lambda t: t.update({"model.layers.0.mamba.in_proj.bias": torch.zeros(8)}), "unexpected tensors.*in_proj.bias"),
])
def test_bad_checkpoint_is_a_clear_error(tmp_path, h1_dir, edit, message):
    directory = copy_checkpoint(h1_dir, tmp_path / "bad")
    edit_weights(directory, edit)
    with pytest.raises(LoadError, match=message):
        LLM(str(directory), device="cpu", dtype="float32")


def test_no_weights_or_not_a_directory(tmp_path, h1_dir):
    directory = copy_checkpoint(h1_dir, tmp_path / "empty")
    (directory / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="no .safetensors"):
        LLM(str(directory), device="cpu")
    with pytest.raises(LoadError, match="not a directory"):
        resolve_model_path(str(directory / "config.json"))


def test_weights_without_a_tokenizer_serve_token_ids(tmp_path, h1_dir):
    directory = copy_checkpoint(h1_dir, tmp_path / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (directory / name).unlink()
    llm = LLM(str(directory), device="cpu", dtype="float32")
    out = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == reference_greedy(h1_dir, PROMPT, 4) and out.text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["text"], SamplingParams(max_tokens=4))
