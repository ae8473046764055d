"""LoRA adapters through a live server and the openai SDK: `model` picks an adapter, outputs equal
transformers+peft, /v1/models lists adapters with their parent, unknown adapters are 404 in OpenAI's
shape, runtime load/unload (vLLM's routes), rank over --max-lora-rank refused; the CLI's flags."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from engine.lora import LoRAModulePath
from server.cli import build_parser, parse_args
from tests.lora_adapters import H1_TARGETS, build_adapter, peft_greedy
from tests.server.conftest import MODEL_NAME, engine_loader

PROMPT = [5, 40, 70, 100, 33, 8, 90, 120, 77]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, h1_dir):
    root = tmp_path_factory.mktemp("server-lora")
    return {"attn": build_adapter(h1_dir, root / "attn", H1_TARGETS["attention"], r=8, alpha=16, seed=1),
            "all": build_adapter(h1_dir, root / "all", H1_TARGETS["all"], r=4, alpha=8, use_rslora=True, seed=2),
            "late": build_adapter(h1_dir, root / "late", H1_TARGETS["mlp"], r=16, alpha=16, seed=3),
            "big": build_adapter(h1_dir, root / "big", ["q_proj"], r=32, alpha=32, seed=4)}


@pytest.fixture(scope="module")
def lora_server(start_server, h1_dir, adapter_dirs):
    modules = [LoRAModulePath("attn", str(adapter_dirs["attn"])),
               LoRAModulePath("all", str(adapter_dirs["all"]), base_model_name="falcon-h1-base")]
    load = engine_loader(h1_dir, enable_lora=True, max_loras=2, max_lora_rank=16, lora_modules=modules,
                         max_model_len=512)
    return start_server(load=load, settings=dict(runtime_lora_updating=True))


@pytest.fixture
def lc(lora_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected_text(server, h1_dir, adapter_dir) -> str:
    tokens, _ = peft_greedy(h1_dir, adapter_dir, PROMPT, MAX_TOKENS)
    return server.state.engine.tokenizer.decode(tokens, skip_special_tokens=True)


def complete(client: openai.OpenAI, model: str) -> str:
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.model == model and r.usage.completion_tokens == MAX_TOKENS
    return r.choices[0].text


def test_models_lists_adapters_with_parent(lc, adapter_dirs):
    cards = {m.id: m for m in lc.models.list().data}
    assert list(cards) == [MODEL_NAME, "alias", "attn", "all"]
    assert cards["attn"].parent == MODEL_NAME and cards["attn"].root == str(adapter_dirs["attn"])
    assert cards["all"].parent == "falcon-h1-base"
    assert cards[MODEL_NAME].parent is None


def test_adapter_outputs_equal_peft(lora_server, lc, h1_dir, adapter_dirs):
    for name in ["attn", "all"]:
        assert complete(lc, name) == expected_text(lora_server, h1_dir, adapter_dirs[name])
    assert complete(lc, MODEL_NAME) == expected_text(lora_server, h1_dir, None)


def test_concurrent_requests_for_base_and_adapters(lora_server, h1_dir, adapter_dirs):
    """Base and two adapters at once, streamed and not: each gets its own model's output."""
    client = openai.AsyncOpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    async def one(model: str, stream: bool) -> str:
        kwargs = dict(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                      extra_body={"ignore_eos": True})
        if not stream:
            return (await client.completions.create(**kwargs)).choices[0].text
        return "".join([c.choices[0].text async for c in await client.completions.create(stream=True, **kwargs)])

    async def run():
        return await asyncio.gather(*(one(m, s) for m in [MODEL_NAME, "attn", "all"] for s in (False, True)))

    texts = asyncio.run(run())
    want = [expected_text(lora_server, h1_dir, adapter_dirs.get(m)) for m in [MODEL_NAME, "attn", "all"]]
    assert texts == [w for w in want for _ in range(2)]
    lora_server.assert_released()
    assert lora_server.state.engine.engine.lora.refs == [0, 0]


def test_chat_with_an_adapter(lc):
    r = lc.chat.completions.create(model="all", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.model == "all" and r.usage.completion_tokens >= 1


def test_unknown_adapter_is_404(lora_server, lc):
    with pytest.raises(openai.NotFoundError) as e:
        complete(lc, "no-such-adapter")
    error = e.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model" and "attn" in error["message"]
    r = httpx.post(lora_server.url + "/v1/chat/completions",
                   json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_runtime_load_and_unload(lora_server, lc, h1_dir, adapter_dirs):
    url = lora_server.url + "/v1"
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "late", "lora_path": str(adapter_dirs["late"])})
    assert r.status_code == 200 and "added" in r.text
    assert "late" in [m.id for m in lc.models.list().data]
    # Three adapters, two device slots: running one evicts another, and all still give their outputs.
    for name in ["late", "attn", "all", "late"]:
        assert complete(lc, name) == expected_text(lora_server, h1_dir, adapter_dirs[name])
    again = httpx.post(url + "/load_lora_adapter", json={"lora_name": "late", "lora_path": str(adapter_dirs["late"])})
    assert again.status_code == 400 and "already in use" in again.json()["error"]["message"]
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "late"})
    assert r.status_code == 200 and "removed" in r.text
    with pytest.raises(openai.NotFoundError):
        complete(lc, "late")
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "late"}).status_code == 404


def test_runtime_load_refuses_bad_adapters(lora_server, adapter_dirs, tmp_path):
    url = lora_server.url + "/v1/load_lora_adapter"
    r = httpx.post(url, json={"lora_name": "big", "lora_path": str(adapter_dirs["big"])})
    assert r.status_code == 400 and "--max-lora-rank 16" in r.json()["error"]["message"]
    r = httpx.post(url, json={"lora_name": "missing", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    assert "big" not in [m["id"] for m in httpx.get(lora_server.url + "/v1/models").json()["data"]]
    r = httpx.post(url, json={"lora_name": "late", "lora_path": str(adapter_dirs["late"]), "load_inplace": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "load_inplace"
    r = httpx.post(url, json={"lora_name": 7, "lora_path": str(adapter_dirs["late"])})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_runtime_routes_need_the_switch(server):
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"})
    assert r.status_code == 404


def test_over_rank_adapter_at_start_up_fails_the_load(start_server, h1_dir, adapter_dirs):
    load = engine_loader(h1_dir, enable_lora=True, max_model_len=512,
                         lora_modules=[LoRAModulePath("big", str(adapter_dirs["big"]))])
    live = start_server(load=load, ready=False)
    deadline = time.monotonic() + 60
    while live.state.load_error is None:
        assert time.monotonic() < deadline, "the load did not fail"
        time.sleep(0.05)
    assert "--max-lora-rank 16" in str(live.state.load_error)


def test_cli_lora_flags(capsys):
    parser = build_parser()
    args = parse_args(parser, ["--enable-lora", "--lora-modules", "a=/x/a",
                               '{"name": "b", "path": "org/b", "base_model_name": "base"}',
                               "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "8"])
    assert args.lora_modules == [LoRAModulePath("a", "/x/a"), LoRAModulePath("b", "org/b", "base")]
    assert (args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (4, 64, 8)
    for bad, message in ((["--lora-modules", "a=/x"], "needs --enable-lora"),
                         (["--enable-lora", "--lora-modules", "no-equals"], "expected name=path"),
                         (["--enable-lora", "--lora-modules", '{"name": "b"}'], "expected {"),
                         (["--enable-lora", "--served-model-name", "m", "--lora-modules", "m=/x"], "unique"),
                         (["--enable-lora", "--lora-modules", "a=/x", "a=/y"], "unique")):
        with pytest.raises(SystemExit):
            parse_args(parser, bad)
        assert message in capsys.readouterr().err


def test_lora_flags_in_a_preset(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("enable_lora: true\nlora_modules: [a=/x/a]\nmax_loras: 3\n")
    args = parse_args(build_parser(), ["--config", str(preset)])
    assert args.enable_lora and args.lora_modules == [LoRAModulePath("a", "/x/a")] and args.max_loras == 3
