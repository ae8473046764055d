"""engine/tokenizer.py: loading, encode/decode, chat templates, streaming detokenization."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from engine.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    MAX_MERGES,
    SPECIAL_TOKENS,
    IncrementalDetokenizer,
    Tokenizer,
    byte_level_tokenizer_files,
)

PAD, BOS, EOS, IM_START, IM_END = range(5)
BYTE0 = len(SPECIAL_TOKENS)  # id of byte 0x00 in the byte-level tokenizer; byte b is BYTE0 + b
FFFD = "\ufffd"

TEXTS = {
    "ascii": "Hello, world! The quick brown fox.\n\tdef f(x): return x * 2  ",
    "latin": "Grüße aus München, où est la gare? ¿Dónde está?",  # 2-byte chars
    "cjk": "敏捷的棕色狐狸跳过了懒狗。中文字符测试，日本語のテスト、안녕하세요",  # 3-byte chars
    "emoji": "🦅 flies 😀😃 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇦🇪 ❤️",  # 4-byte chars, ZWJ sequences, flags
    "combining": "e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353 ñ vs n\u0303 \u0915\u094d\u0937",
    "mixed": "Привет мир! مرحبا 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f\u200b\ufeff end",
}


def _enc(t: Tokenizer, text: str) -> list[int]:
    return t.encode(text, add_special_tokens=False)


def _write(d: Path, name: str, data: object) -> None:
    (d / name).write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module", params=[0, 60, MAX_MERGES], ids=lambda m: f"merges{m}")
def tok_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp(f"tok{request.param}")
    byte_level_tokenizer_files(d, merges=request.param)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """No merges: every token is exactly one byte, so multi-byte characters always span tokens."""
    d = tmp_path_factory.mktemp("bytes")
    byte_level_tokenizer_files(d, merges=0)
    return Tokenizer.from_pretrained(d)


# ---------------------------------------------------------------- files, encode, decode


@pytest.mark.parametrize("name", TEXTS)
def test_round_trip(tok: Tokenizer, name: str) -> None:
    text = TEXTS[name]
    ids = tok.encode(text, add_special_tokens=False)
    assert all(BYTE0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert len(ids) <= len(text.encode("utf-8"))


def test_builder_vocab_small_deterministic_and_merges_span_bytes(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        byte_level_tokenizer_files(tmp_path / sub, merges=MAX_MERGES)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    t = Tokenizer.from_pretrained(tmp_path / "a")
    assert t.vocab_size == 511 < 512
    assert t.encode("中文", add_special_tokens=False) != [BYTE0 + b for b in "中文".encode()]
    assert len(t.encode("the fox", add_special_tokens=False)) < len("the fox")
    assert Tokenizer.from_pretrained(tmp_path / "a").vocab_size == 511
    plain = tmp_path / "plain"
    byte_level_tokenizer_files(plain)
    assert Tokenizer.from_pretrained(plain).vocab_size == BYTE0 + 256
    with pytest.raises(ValueError):
        byte_level_tokenizer_files(tmp_path / "c", merges=MAX_MERGES + 1)


def test_builder_special_tokens(tok: Tokenizer) -> None:
    assert tok.bos_token_id == BOS and tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token_id == EOS and tok.eos_token == "<|end_of_text|>"
    assert tok.eos_token_ids == {EOS, IM_END}  # tokenizer_config + generation_config list
    assert tok.pad_token_id == PAD
    assert tok.all_special_ids == {PAD, BOS, EOS, IM_START, IM_END}
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    ids = tok.encode("<|im_start|>user<|im_end|>")  # special tokens in text map to their ids
    assert ids[0] == IM_START and ids[-1] == IM_END and IM_START not in ids[1:-1]


def test_encode_bos_handling(tmp_path: Path) -> None:
    byte_level_tokenizer_files(tmp_path, add_bos_token=True)
    t = Tokenizer.from_pretrained(tmp_path)
    assert t.encode("hi") == [BOS, BYTE0 + ord("h"), BYTE0 + ord("i")]
    assert t.encode("hi", add_special_tokens=False) == [BYTE0 + ord("h"), BYTE0 + ord("i")]
    assert t.encode("<|begin_of_text|>hi") == [BOS, BYTE0 + ord("h"), BYTE0 + ord("i")]  # no double bos
    assert t.encode("") == [BOS]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["add_bos_token"]  # absent means False, even though tokenizer.json has a bos post-processor
    _write(tmp_path, "tokenizer_config.json", config)
    assert Tokenizer.from_pretrained(tmp_path).encode("hi") == [BYTE0 + ord("h"), BYTE0 + ord("i")]


def test_decode_skip_special_tokens(tok: Tokenizer) -> None:
    ids = [BOS, *tok.encode("a中", add_special_tokens=False), IM_END, PAD, EOS]
    assert tok.decode(ids) == "a中"
    full = "<|begin_of_text|>a中<|im_end|><|pad|><|end_of_text|>"
    assert tok.decode(ids, skip_special_tokens=False) == full
    assert tok.decode([BYTE0 + 0xE4, BYTE0 + 0xB8]) == FFFD  # incomplete bytes never raise


def test_special_tokens_string_dict_and_generation_config(tmp_path: Path) -> None:
    byte_level_tokenizer_files(tmp_path)
    _write(tmp_path, "tokenizer_config.json", {
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "special": True},
        "eos_token": {"content": "<|im_end|>"},
        "pad_token": None,
    })
    _write(tmp_path, "generation_config.json", {"eos_token_id": EOS, "pad_token_id": PAD})
    t = Tokenizer.from_pretrained(tmp_path)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (BOS, IM_END, PAD)
    assert t.eos_token_ids == {IM_END, EOS}
    assert t.add_bos_token is False and t.encode("x") == [BYTE0 + ord("x")]

    _write(tmp_path, "tokenizer_config.json", {"eos_token": "<|end_of_text|>", "add_bos_token": True})
    _write(tmp_path, "generation_config.json", {"bos_token_id": BOS, "eos_token_id": [IM_END, IM_START]})
    t = Tokenizer.from_pretrained(tmp_path)
    assert (t.bos_token_id, t.eos_token_id, t.eos_token_ids) == (BOS, EOS, {EOS, IM_END, IM_START})
    assert t.pad_token_id is None and t.encode("x") == [BOS, BYTE0 + ord("x")]

    (tmp_path / "tokenizer_config.json").unlink()
    _write(tmp_path, "generation_config.json", {"eos_token_id": [IM_END, EOS]})
    t = Tokenizer.from_pretrained(tmp_path)
    assert (t.bos_token_id, t.eos_token_id, t.eos_token_ids) == (None, IM_END, {IM_END, EOS})
    assert t.chat_template is None


def test_added_tokens_decoder_registers_new_special_token(tmp_path: Path) -> None:
    byte_level_tokenizer_files(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    new_id = BYTE0 + 256
    config["added_tokens_decoder"][str(new_id)] = {"content": "<|tool|>", "special": True}
    _write(tmp_path, "tokenizer_config.json", config)
    t = Tokenizer.from_pretrained(tmp_path)
    assert t.vocab_size == new_id + 1
    assert new_id in t.all_special_ids
    assert t.encode("a<|tool|>b", add_special_tokens=False) == [BYTE0 + ord("a"), new_id, BYTE0 + ord("b")]
    assert t.decode([new_id, BYTE0 + ord("a")]) == "a"


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as e:
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_transformers_loads_the_same_tokenizer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    for bos in (False, True):
        d = tmp_path / str(bos)
        byte_level_tokenizer_files(d, merges=100, add_bos_token=bos)
        ours = Tokenizer.from_pretrained(d)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
        for text in [*TEXTS.values(), "<|im_start|>user\nhi<|im_end|>"]:
            ids = ours.encode(text)
            assert fast(text)["input_ids"] == ids
            assert fast.decode(ids, skip_special_tokens=True) == ours.decode(ids)
            assert fast.decode(ids) == ours.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------- chat templates


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🦅"}]


def test_chat_template_from_tokenizer_config(tok: Tokenizer) -> None:
    out = tok.apply_chat_template(MESSAGES)
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🦅<|im_end|>\n"
                   "<|im_start|>assistant\n")
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("Hi 🦅<|im_end|>\n")
    ids = tok.encode(out, add_special_tokens=False)
    assert ids[0] == IM_START and ids.count(IM_END) == 2 and tok.decode(ids, skip_special_tokens=False) == out


def test_chat_template_sources_and_precedence(tmp_path: Path) -> None:
    byte_level_tokenizer_files(tmp_path, chat_template=None)
    with pytest.raises(ValueError, match="--chat-template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES)

    (tmp_path / "chat_template.jinja").write_text("FILE{{ messages | length }}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES) == "FILE2"

    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                               {"name": "default", "template": "DEF"}]
    _write(tmp_path, "tokenizer_config.json", config)
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES) == "DEF"

    config["chat_template"] = "CONFIG{{ bos_token }}{{ eos_token }}"
    _write(tmp_path, "tokenizer_config.json", config)
    t = Tokenizer.from_pretrained(tmp_path)
    assert t.apply_chat_template(MESSAGES) == "CONFIG<|begin_of_text|><|end_of_text|>"
    t = Tokenizer.from_pretrained(tmp_path, chat_template="OVERRIDE{{ add_generation_prompt }}")
    assert t.apply_chat_template(MESSAGES) == "OVERRIDETrue"
    assert t.apply_chat_template(MESSAGES, add_generation_prompt=False) == "OVERRIDEFalse"


def test_chat_template_content_parts_and_kwargs(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert tok.apply_chat_template(msgs) == "<|im_start|>user\none\ntwo<|im_end|>\n<|im_start|>assistant\n"
    assert msgs[0]["content"][0] == {"type": "text", "text": "one"}  # caller's messages untouched
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    template = "{{ greeting }} {{ messages[0]['content'] | tojson }} {{ strftime_now('%Y') | length }}"
    out = tok.apply_chat_template([{"role": "user", "content": "<é>"}], chat_template=template, greeting="yo")
    assert out == 'yo "<é>" 4'


def test_chat_template_jinja_environment(tok: Tokenizer) -> None:
    template = (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}\n"
        "[{{ m['content'] }}]\n"
        "{% endfor %}"
    )
    # trim_blocks + lstrip_blocks: block lines leave no whitespace behind
    assert tok.apply_chat_template(MESSAGES[1:], chat_template=template) == "[Hi 🦅]\n"
    with pytest.raises(ValueError, match="no system role"):
        tok.apply_chat_template(MESSAGES, chat_template=template)
    with pytest.raises(ValueError):  # sandboxed and immutable
        tok.apply_chat_template(MESSAGES, chat_template="{{ messages.append(1) }}")
    with pytest.raises(ValueError):
        tok.apply_chat_template(MESSAGES, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError):  # syntax error
        tok.apply_chat_template(MESSAGES, chat_template="{% for %}")


# ---------------------------------------------------------------- incremental detokenization


def _stream(t: Tokenizer, gen: list[int], prompt: list[int] | None = None, skip: bool = True
            ) -> tuple[list[str], str, IncrementalDetokenizer]:
    det = IncrementalDetokenizer(t, prompt or [], skip_special_tokens=skip)
    pieces = [det.add(i) for i in gen]
    tail = det.flush()
    assert det.text == "".join(pieces) + tail
    assert det.token_ids == gen
    return pieces, tail, det


@pytest.mark.parametrize("name", TEXTS)
def test_stream_valid_text_matches_decode(tok: Tokenizer, name: str) -> None:
    text = TEXTS[name]
    prompt = _enc(tok, tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    gen = [*tok.encode(text, add_special_tokens=False), IM_END]
    for context in ([], prompt):
        pieces, tail, det = _stream(tok, gen, context)
        assert not any(FFFD in p for p in pieces), pieces
        assert tail == ""
        assert det.text == tok.decode(gen) == text


def test_stream_splits_multibyte_characters(byte_tok: Tokenizer) -> None:
    for ch in ("é", "中", "😀"):  # 2, 3, 4 bytes: one byte per token, held until the character completes
        gen = byte_tok.encode(ch, add_special_tokens=False)
        assert len(gen) == len(ch.encode())
        assert byte_tok.decode(gen[:1]) == FFFD  # the split really happens
        pieces, tail, _ = _stream(byte_tok, gen)
        assert pieces == [""] * (len(gen) - 1) + [ch] and tail == ""


def test_stream_merged_tokens_that_split_characters(tmp_path: Path) -> None:
    byte_level_tokenizer_files(tmp_path, merges=60)
    t = Tokenizer.from_pretrained(tmp_path)
    text = "中文字符测试 😀 Grüße"
    gen = t.encode(text, add_special_tokens=False)
    assert any(FFFD in t.decode([i]) for i in gen)  # some tokens hold only part of a character
    pieces, tail, det = _stream(t, gen)
    assert not any(FFFD in p for p in pieces) and tail == "" and det.text == text


def test_stream_invalid_bytes_become_replacement_chars(byte_tok: Tokenizer) -> None:
    b = [BYTE0 + x for x in (0x80, 0x41)]  # lone continuation byte, then "A"
    pieces, tail, det = _stream(byte_tok, b)
    assert pieces == ["", FFFD + "A"] and det.text == byte_tok.decode(b) == FFFD + "A"

    truncated = byte_tok.encode("ok", add_special_tokens=False) + [BYTE0 + x for x in (0xF0, 0x9F, 0x98)]
    pieces, tail, det = _stream(byte_tok, truncated)
    assert "".join(pieces) == "ok" and tail == FFFD and det.text == byte_tok.decode(truncated) == "ok" + FFFD

    junk = [BYTE0 + 0xC0] * 30  # never-valid bytes: released mid-stream, not held to the end
    pieces, tail, det = _stream(byte_tok, junk)
    assert "".join(pieces) == FFFD * 29 and tail == FFFD and det.text == byte_tok.decode(junk)

    broken = [BYTE0 + x for x in (0xE4, 0xB8, 0x41, 0xF0, 0x9F, 0x98, 0x80)]  # 中 cut short, then A 😀
    pieces, tail, det = _stream(byte_tok, broken)
    assert det.text == byte_tok.decode(broken) == FFFD + "A😀" and tail == ""


def test_stream_prompt_ending_mid_character(byte_tok: Tokenizer) -> None:
    prompt = byte_tok.encode("x", add_special_tokens=False) + [BYTE0 + 0xE4]
    gen = [BYTE0 + 0xB8, BYTE0 + 0xAD, BYTE0 + ord("y")]
    _, _, det = _stream(byte_tok, gen, prompt)
    assert det.text == byte_tok.decode(gen) == FFFD + FFFD + "y"


def test_stream_skip_special_tokens(tok: Tokenizer) -> None:
    gen = [*_enc(tok, "a😀"), IM_END, BOS, *_enc(tok, "中b"), EOS]
    for skip, expected in ((True, "a😀中b"), (False, "a😀<|im_end|><|begin_of_text|>中b<|end_of_text|>")):
        pieces, _, det = _stream(tok, gen, skip=skip)
        assert det.text == tok.decode(gen, skip_special_tokens=skip) == expected
        assert not any(FFFD in p for p in pieces)
    # a special token in the middle of a character's bytes is dropped, the character survives
    bytes_ = [BYTE0 + x for x in "中".encode()]
    gen = [bytes_[0], IM_END, *bytes_[1:]]
    assert _stream(tok, gen)[2].text == tok.decode(gen) == "中"


def test_stream_random_tokens_match_decode(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        gen = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 8))]
        skip = rng.random() < 0.5
        assert _stream(tok, gen, prompt, skip)[2].text == tok.decode(gen, skip_special_tokens=skip)


def test_stream_window_stays_small(tok: Tokenizer) -> None:
    rng = random.Random(7)
    gen = tok.encode(" ".join(rng.choice(list(TEXTS.values())) for _ in range(200)), add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [])
    for i in gen:
        det.add(i)
        assert len(det._window) <= 12  # decoding cost per token does not grow with the sequence
    det.flush()
    assert det.text == tok.decode(gen)


def _sentencepiece_like() -> tuple[Tokenizer, dict[str, int]]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Hello": 3, "▁world": 4, "!": 5, "▁": 6}
    vocab.update({f"<0x{b:02X}>": 7 + b for b in range(256)})
    ht = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    ht.pre_tokenizer = pre_tokenizers.Metaspace()
    ht.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    ht.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return Tokenizer(ht, bos_token_id=1, eos_token_id=2), vocab


def test_stream_sentencepiece_leading_space_and_byte_fallback() -> None:
    t, v = _sentencepiece_like()
    gen = [v["▁world"], v["!"], v["▁Hello"]]
    pieces, _, det = _stream(t, gen, prompt=[v["<s>"], v["▁Hello"]])
    assert pieces == [" world", "!", " Hello"]  # the leading space survives with the prompt as context
    pieces, _, det = _stream(t, gen)
    assert pieces == ["world", "!", " Hello"] and det.text == t.decode(gen)
    emoji = [v[f"<0x{b:02X}>"] for b in "😀".encode()]
    pieces, _, det = _stream(t, [v["▁Hello"], *emoji, v["!"]])
    assert pieces == ["Hello", "", "", "", "😀", "!"]
