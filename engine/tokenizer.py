"""Tokenizer wrapper, chat templates, streaming detokenization and a tiny byte-level tokenizer builder.

`Tokenizer` reads a checkpoint directory (tokenizer.json, tokenizer_config.json,
generation_config.json, chat_template.jinja) with the `tokenizers` library only.
`IncrementalDetokenizer` turns one generated token at a time into text deltas.
`byte_level_tokenizer_files` writes a small, deterministic byte-level BPE tokenizer
for the demo model and the test checkpoints.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- chat templates


class _GenerationTagExtension(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by some HF templates) as a no-op block."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Like transformers: no HTML escaping (jinja's default tojson escapes < > & ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTagExtension, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _flatten_content(content: Any) -> Any:
    """OpenAI content may be a list of parts; templates get the text parts joined by newlines."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"unsupported message content part {kind!r}: only text parts are supported")
    return "\n".join(texts)


# ---------------------------------------------------------------- tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token facts and chat template of one checkpoint."""

    def __init__(self, tokenizer: HFTokenizer, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, extra_eos_token_ids: Iterable[int] = (),
                 pad_token_id: int | None = None, add_bos_token: bool = False,
                 chat_template: str | None = None) -> None:
        self.hf_tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        extra = list(extra_eos_token_ids)
        # the primary eos is tokenizer_config's, else the first from generation_config
        self.eos_token_id = eos_token_id if eos_token_id is not None else next(iter(extra), None)
        self.eos_token_ids: set[int] = set(extra) | ({eos_token_id} if eos_token_id is not None else set())
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        added = tokenizer.get_added_tokens_decoder()
        specials = {i for i, t in added.items() if t.special}
        specials |= {i for i in (bos_token_id, pad_token_id) if i is not None} | self.eos_token_ids
        self.all_special_ids: set[int] = specials
        self.vocab_size: int = max([tokenizer.get_vocab_size(True), *(i + 1 for i in added)])

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (expected {tokenizer_file})")
        tok = HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        gen_config = _read_json(path / "generation_config.json")

        # Register added tokens that tokenizer.json does not know (or does not mark special).
        known_special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        for id_str, info in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            content, special = info.get("content"), bool(info.get("special", False))
            known = tok.token_to_id(content) is not None if content else True
            if known and (not special or content in known_special):
                continue
            tok.add_tokens([AddedToken(content, special=special, normalized=not special)])
            if (got := tok.token_to_id(content)) != int(id_str):
                logger.warning("added token %r got id %s, tokenizer_config says %s", content, got, id_str)

        def token_id(field: str) -> int | None:
            content = _token_content(config.get(field))
            if content is None:
                return None
            tid = tok.token_to_id(content)
            if tid is None:
                logger.warning("%s %r from tokenizer_config.json is not in the vocabulary", field, content)
            return tid

        gen_eos = gen_config.get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else [i for i in gen_eos or [] if type(i) is int]
        bos = token_id("bos_token")
        pad = token_id("pad_token")
        template = chat_template if chat_template is not None else cls._find_chat_template(path, config)
        return cls(
            tok,
            bos_token_id=bos if bos is not None else gen_config.get("bos_token_id"),
            eos_token_id=token_id("eos_token"),
            extra_eos_token_ids=gen_eos_ids,
            pad_token_id=pad if pad is not None else gen_config.get("pad_token_id"),
            add_bos_token=config.get("add_bos_token") is True,
            chat_template=template,
        )

    @staticmethod
    def _find_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]: take "default", else the first
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default", next(iter(named.values()), None))
        if isinstance(template, str) and template:
            return template
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        return None

    # -- token helpers

    def _token_str(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.hf_tokenizer.id_to_token(token_id)

    @property
    def bos_token(self) -> str | None:
        return self._token_str(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token_str(self.eos_token_id)

    @property
    def pad_token(self) -> str | None:
        return self._token_str(self.pad_token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.hf_tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf_tokenizer.id_to_token(token_id)

    # -- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; bos is prepended only if the config says add_bos_token (and never twice)."""
        # encode_batch releases the GIL (encode does not), so a long text does not stall other threads.
        ids = self.hf_tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return self.hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- chat

    def chat_template_uses(self, variable: str, chat_template: str | None = None) -> bool:
        """Whether the chat template (this tokenizer's unless given) reads `variable` (e.g. "tools")."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            return False
        env = _compile_template(template).environment
        return variable in jinja2.meta.find_undeclared_variables(env.parse(template))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """Render messages with the chat template (sandboxed jinja2, like transformers)."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError(
                "this model has no chat template (none in tokenizer_config.json or chat_template.jinja); "
                "pass one with --chat-template"
            )
        msgs = [{**m, "content": _flatten_content(m["content"])} if "content" in m else m for m in messages]
        variables: dict[str, Any] = {
            "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
        }
        variables.update(kwargs)
        try:
            return _compile_template(template).render(
                messages=msgs, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e


# ---------------------------------------------------------------- streaming detokenization


def _is_byte_fallback_token(token: str | None) -> bool:
    return token is not None and len(token) == 6 and token.startswith("<0x") and token.endswith(">")


class IncrementalDetokenizer:
    """Text deltas of one generated sequence, one token at a time.

    Prefix-offset / read-offset technique: decode a small window of tokens ending at the newest
    one and diff it against the already-emitted text of the same window (`prefix_text`). The window
    starts one committed chunk back, so SentencePiece-style leading spaces come out right. While the
    window's text ends in U+FFFD (an unfinished multi-byte character) nothing is emitted; a tail
    that can never finish is released as U+FFFD once a later token proves it invalid (a clean cut),
    and `flush()` releases whatever is still held at the end.

    For byte-level BPE (GPT-2 style, as Falcon-H1 uses) the pieces add up to exactly
    `tokenizer.decode(generated_ids)`. Two deliberate differences elsewhere: with a SentencePiece
    tokenizer the first generated token keeps its leading space when the prompt gives context, and
    byte-fallback runs that decoded validly are not taken back if later bytes make the run invalid.
    Use `text` as the final output of streaming and non-streaming requests alike.
    """

    CONTEXT_TOKENS = 5  # prompt tokens decoded as left context of the first generated token
    CUT_SEARCH = 8  # how far back to look for a clean cut inside a held-back tail
    MAX_PENDING = 64  # held-back tokens before the tail is forced out as is (pathological streams only)

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []  # all generated ids, including skipped special tokens
        self._pieces: list[str] = []
        context = [i for i in prompt_ids[-self.CONTEXT_TOKENS:] if not self._skipped(i)]
        prefix_text = self._decode(context)
        if prefix_text.endswith(REPLACEMENT_CHAR):  # prompt ends mid-character: start without context
            context, prefix_text = [], ""
        self._window: list[int] = context  # window[0:read] is committed text; window[read:] is held back
        self._read = len(context)
        self._prefix_text = prefix_text

    def _skipped(self, token_id: int) -> bool:
        return self.skip_special_tokens and token_id in self.tokenizer.all_special_ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.hf_tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (may be empty)."""
        self.token_ids.append(token_id)
        if self._skipped(token_id):  # decode() drops it too; keep it out of the window
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        pending = len(self._window) - self._read
        if pending >= self.MAX_PENDING:
            return self._commit(len(self._window), text, force=True)
        if not text.endswith(REPLACEMENT_CHAR):
            return self._commit(len(self._window), text)
        return self._commit_clean_cut(text)

    def flush(self) -> str:
        """Release any held-back tail (incomplete bytes become U+FFFD). Call once the sequence ends."""
        if len(self._window) == self._read:
            return ""
        return self._commit(len(self._window), self._decode(self._window), force=True)

    def _commit(self, end: int, text: str, force: bool = False) -> str:
        """Emit window[read:end], whose decoded text is `text`, and slide the window forward."""
        if len(text) <= len(self._prefix_text) and not force:
            return ""  # nothing new yet: keep the window (so a token's leading space keeps its context)
        delta = text[len(self._prefix_text):]
        # The new window starts at the old read offset: one committed chunk stays as left context.
        start = self._read
        self._window = self._window[start:]
        self._read = end - start
        self._prefix_text = self._decode(self._window[: self._read])
        self._pieces.append(delta)
        return delta

    def _commit_clean_cut(self, text: str) -> str:
        """The window ends mid-character. Emit up to the latest cut that decodes the same in two halves,
        i.e. where earlier bytes are final (lone or invalid bytes followed by more bytes)."""
        window, n = self._window, len(self._window)
        for cut in range(n - 1, max(self._read, n - 1 - self.CUT_SEARCH), -1):
            # byte-fallback decoders decode a run of <0xNN> tokens as one unit: never cut inside a run
            if _is_byte_fallback_token(self.tokenizer.id_to_token(window[cut - 1])) and \
                    _is_byte_fallback_token(self.tokenizer.id_to_token(window[cut])):
                continue
            head = self._decode(window[:cut])
            if len(head) <= len(self._prefix_text) or not head.startswith(self._prefix_text):
                continue
            tail = self._decode(window[cut:])
            if tail and head + tail == text:
                return self._commit(cut, head)
        return ""


# ---------------------------------------------------------------- tiny byte-level tokenizer


SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
MAX_MERGES = 511 - len(SPECIAL_TOKENS) - 256  # keep the whole vocabulary below 512

_MERGE_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello world! The capital of France is Paris.
Le renard brun saute par-dessus le chien. Grüße aus München! ¿Dónde está la estación?
Быстрая коричневая лиса прыгает. Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. नमस्ते दुनिया।
敏捷的棕色狐狸跳过了懒狗。你好，世界！中文字符测试。こんにちは、世界！日本語のテスト。안녕하세요, 세계!
Emoji: 😀😃😄😁 🦅🦅 🚀🚀 👍🏽 ❤️ 🎉🎉 🇫🇷 🇦🇪
def main():\n    for i in range(10):\n        print(i * 2)\n    return {"ok": True}
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as used by the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on the byte-level words of `text`; ties break on the pair itself (deterministic)."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: Counter[tuple[str, ...]] = Counter(tuple(w) for w, _ in pre.pre_tokenize_str(text))
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def build_byte_level_tokenizer(merges: int = 0) -> HFTokenizer:
    """Byte-level BPE: special tokens at ids 0-4, the 256 bytes at 5-260 (in byte order), then merges."""
    if not 0 <= merges <= MAX_MERGES:
        raise ValueError(f"merges must be in [0, {MAX_MERGES}], got {merges}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    byte_chars = _bytes_to_unicode()
    for b in range(256):
        vocab[byte_chars[b]] = len(vocab)
    merge_list = _learn_merges(_MERGE_CORPUS, merges)
    for a, b in merge_list:
        vocab.setdefault(a + b, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merge_list))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def byte_level_tokenizer_files(directory: str | Path, merges: int = 0,
                               chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
                               add_bos_token: bool = False) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json of a tiny byte-level
    tokenizer into `directory`. Any text round-trips exactly. Same bytes every call."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pad, bos, eos, _, im_end = SPECIAL_TOKENS
    tok = build_byte_level_tokenizer(merges)
    if add_bos_token:  # so transformers (which follows the post-processor) adds bos the same way we do
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)])
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "add_bos_token": add_bos_token, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    generation = {"bos_token_id": SPECIAL_TOKENS.index(bos), "pad_token_id": SPECIAL_TOKENS.index(pad),
                  "eos_token_id": [SPECIAL_TOKENS.index(eos), SPECIAL_TOKENS.index(im_end)]}
    for name, data in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        (directory / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
