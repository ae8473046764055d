"""Constrained decoding in the engine: with random weights the model's text is noise, so every output
below is valid only because the grammar masks made it so. Greedy and sampled, batched, forked,
preempted; bad grammars refused at admission; the vocabulary's padding rows never sampled."""

import json
import re

import jsonschema
import llguidance
import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import sample
from engine.sequence import Sequence
from engine.structured_output import GrammarCompiler, StructuredOutputsParams, apply_token_bitmask
from engine.tokenizer import Tokenizer
from server.tool_parsers import HermesToolParser
from tests.tiny_models import VOCAB

PROMPTS = ["Give me JSON", "The weather today is"]

# Bounded strings and numbers: with random weights an unbounded string runs for hundreds of tokens.
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5,
                                                                       "maximum": 99}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                               "maxItems": 2}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"$ref": "#/$defs/point"}, "label": {"type": "string", "maxLength": 4}},
     "required": ["point"], "additionalProperties": False,
     "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                          "y": {"enum": [0.5, -1.25, 3]}},
                         "required": ["x", "y"], "additionalProperties": False}}},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,5}$"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": ["string", "null"], "maxLength": 3}}, "required": ["name", "age"],
        "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
]
REGEX = r"(\+|-)?[0-9]{1,3}\.[0-9]{2} [A-Z][a-z]{0,3}"
LARK = 'start: "call " NAME "(" NUM ("," NUM)? ")"\nNAME: /[a-z]{1,4}/\nNUM: /[0-9]{1,2}/'
CHOICES = ["yes", "no", "perhaps not"]
OTHER_SPECS = [  # (spec, what a valid output looks like)
    (dict(regex=REGEX), lambda t: re.fullmatch(REGEX, t)),
    (dict(choice=CHOICES), lambda t: t in CHOICES),
    (dict(grammar=LARK), lambda t: re.fullmatch(r"call [a-z]{1,4}\([0-9]{1,2}(,[0-9]{1,2})?\)", t)),
]


@pytest.fixture(scope="module")
def llm(h1_dir):
    return LLM(str(h1_dir), device="cpu", dtype="float32", max_num_seqs=32, max_model_len=512)


def constrained(temperature: float, max_tokens: int = 80, **spec) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=7,
                          structured_outputs=StructuredOutputsParams(**spec))


def test_every_output_is_valid_greedy_and_sampled(llm):
    """All in one batch (CPU steps are slow): JSON schemas, regex, choice and Lark, greedy and sampled,
    4 samples forked from one prompt (each its own matcher), and any JSON object."""
    cases = [(dict(json=s), lambda t, s=s: jsonschema.validate(json.loads(t), s) or True) for s in SCHEMAS]
    cases += OTHER_SPECS
    requests = [(prompt, constrained(temperature, **spec), valid) for spec, valid in cases
                for temperature in (0.0, 1.0) for prompt in PROMPTS]
    forked = SamplingParams(n=4, max_tokens=80, temperature=1.0, seed=3,
                            structured_outputs=StructuredOutputsParams(json=SCHEMAS[1]))
    requests.append(("tell", forked, cases[1][1]))
    objects = [("obj", constrained(1.0, max_tokens=40, json_object=True), None)] * 4
    outputs = llm.generate([r[0] for r in requests + objects], [r[1] for r in requests + objects])
    for (_, params, valid), out in zip(requests, outputs):
        for completion in out.outputs:
            assert completion.finish_reason == "stop", (params.structured_outputs, completion)
            assert valid(completion.text), (params.structured_outputs, completion.text)
    assert len({c.text for c in outputs[len(requests) - 1].outputs}) > 1  # the samples differ
    finished = [o.outputs[0] for o in outputs[len(requests):] if o.outputs[0].finish_reason == "stop"]
    assert finished  # an open-ended object may run to max_tokens; those that end are objects
    for completion in finished:
        assert isinstance(json.loads(completion.text), dict)


def test_constrained_outputs_do_not_depend_on_batch_mates(llm):
    greedy, seeded = constrained(0.0, json=SCHEMAS[2]), constrained(1.0, json=SCHEMAS[4])  # seed 7
    alone = [llm.generate([PROMPTS[1]], p)[0].outputs[0].token_ids for p in (greedy, seeded)]
    others = [SamplingParams(max_tokens=20, temperature=1.0), constrained(1.0, json=SCHEMAS[0]),
              constrained(0.0, regex="[a-z]+")]
    batch = llm.generate(["a", "b", PROMPTS[1], "c", PROMPTS[1]], [others[0], others[1], greedy, others[2], seeded])
    assert [batch[2].outputs[0].token_ids, batch[4].outputs[0].token_ids] == alone


def test_preempted_constrained_sequences_resume_where_they_were(llm, h1_dir):
    tight = LLM(str(h1_dir), device="cpu", dtype="float32", max_num_seqs=4, max_model_len=128,
                max_num_batched_tokens=16, kv_block_size=4, num_kv_blocks=16)
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                             structured_outputs=StructuredOutputsParams(regex=r"[a-z]{12,30}"))] * 4
    prompts = ["one two three", "four", "five six", "seven eight nine ten"]
    want = [o.outputs[0].text for o in llm.generate(prompts, params)]
    got = [o.outputs[0].text for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == want


def test_stop_strings_and_max_tokens_cut_a_constrained_output(llm):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999}, "minItems": 6,
              "maxItems": 6}
    out = llm.generate("x", constrained(0.0, json=schema, max_tokens=5))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and out.text.startswith("[")
    p = SamplingParams(max_tokens=200, temperature=0, stop=[","], structured_outputs=StructuredOutputsParams(
        json=schema))
    out = llm.generate("x", p)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "," and re.fullmatch(r"\[[0-9]{3}", out.text)


def test_bad_grammars_are_refused_at_admission(llm):
    bad = [dict(json={"type": "object", "properties": {"a": {"type": "no-such-type"}}}), dict(json="{not json"),
           dict(regex="[a-"), dict(grammar="start: undefined_rule"), dict(json={"type": "string", "format": "bogus"})]
    for spec in bad:
        with pytest.raises(ValueError, match="grammar|schema|JSON"):
            llm.generate("x", constrained(0.0, **spec))
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})


def test_grammar_is_compiled_once_per_spec(llm, monkeypatch):
    grammars = llm.engine.grammars
    spec = StructuredOutputsParams(regex="[0-9]{4}")
    first = grammars.compile(spec)
    calls = []
    monkeypatch.setattr(StructuredOutputsParams, "to_grammar", lambda self: calls.append(self) or "")
    second = grammars.compile(StructuredOutputsParams(regex="[0-9]{4}"))
    assert not calls and second is not first  # each sequence gets its own copy of the cached start state
    assert second.consume_tokens(llm.tokenizer.encode("12", add_special_tokens=False)) and first.is_accepting() is False


def test_objects_that_list_their_properties_get_only_those(llm):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "o": {"type": "object"}}}
    matcher = llm.engine.grammars.compile(StructuredOutputsParams(json=schema))
    encode = llm.tokenizer.encode
    assert matcher.consume_tokens(encode('{"a": 1, "o": {"free": true}', False))  # no properties: open
    assert matcher.validate_tokens(encode(', "b"', False)) < len(encode(', "b"', False))  # listed: closed
    open_schema = {**schema, "additionalProperties": True}
    matcher = llm.engine.grammars.compile(StructuredOutputsParams(json=open_schema))
    assert matcher.consume_tokens(encode('{"a": 1, "b": 2}', False))


def test_padding_rows_of_the_vocabulary_are_never_allowed(llm):
    tokenizer: Tokenizer = llm.tokenizer
    assert tokenizer.vocab_size < VOCAB  # the tiny model pads its vocabulary
    grammars = llm.engine.grammars
    matcher = grammars.compile(StructuredOutputsParams(regex="(.|\n)*"))
    bitmask = grammars.fill_bitmask([matcher]).clone()
    logits = torch.zeros(1, VOCAB)
    apply_token_bitmask(logits, [0], bitmask)
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and max(allowed) < tokenizer.vocab_size
    assert 2 in allowed and all(t not in allowed for t in (0, 1, 3))  # eos yes; other special tokens no


def test_bitmask_matches_a_plain_reference_and_spares_other_rows():
    torch.manual_seed(0)
    V = 70
    words = torch.randint(-2**31, 2**31 - 1, (2, 3), dtype=torch.int32)
    logits = torch.randn(4, V)
    masked = logits.clone()
    apply_token_bitmask(masked, [1, 3], words)
    for j, row in enumerate([1, 3]):
        for t in range(V):
            bit = (int(words[j, t // 32]) >> (t % 32)) & 1
            assert masked[row, t] == (logits[row, t] if bit else float("-inf"))
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])


def test_sampler_picks_only_allowed_tokens(llm):
    grammars = llm.engine.grammars
    seqs = []
    for i in range(3):
        seq = Sequence(str(i), 0, [5, 6], SamplingParams(temperature=1.0))
        seq.grammar = grammars.compile(StructuredOutputsParams(choice=["ab", "xyz"])) if i != 1 else None
        seqs.append(seq)
    mask = grammars.fill_bitmask([seqs[0].grammar, seqs[2].grammar]).clone()
    allowed = set(llm.tokenizer.encode("a", add_special_tokens=False)[:1] + llm.tokenizer.encode("x", False)[:1])
    for _ in range(20):
        result = sample(torch.randn(3, VOCAB), seqs, {2}, ([0, 2], mask))
        assert result.token_ids[0] in allowed and result.token_ids[2] in allowed


def test_auto_tool_grammar_is_free_text_until_a_call_opens(llm):
    """The lazy grammar of tool_choice "auto": anything goes until "<tool_call>", then a valid call."""
    tokenizer, grammars = llm.tokenizer, llm.engine.grammars
    parser = HermesToolParser(tokenizer)
    tools = [{"name": "get_weather", "parameters": SCHEMAS[1]}, {"name": "noop"}]
    spec = StructuredOutputsParams(grammar=parser.grammar(tools, "auto", parallel=True))
    free = grammars.compile(spec)
    assert free.consume_tokens(tokenizer.encode("any <b>text</b> at all", False)) and free.is_accepting()
    gen = torch.Generator().manual_seed(0)
    for trial in range(4):
        matcher = grammars.compile(spec)
        text = f"Let me check {trial}.\n<tool_call>"
        ids = tokenizer.encode(text, False)
        assert matcher.consume_tokens(ids)
        assert matcher.validate_tokens(tokenizer.encode("oops", False)) == 0  # no free text inside a call
        while not matcher.is_stopped() and len(ids) < 400:
            bitmask = grammars.fill_bitmask([matcher]).clone()
            logits = torch.randn(1, VOCAB, generator=gen)
            apply_token_bitmask(logits, [0], bitmask)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
            if token == 2:  # eos, allowed once a call is complete
                break
            assert matcher.consume_token(token)
            ids.append(token)
        content, calls = parser.extract(tokenizer.decode(ids))
        assert content == f"Let me check {trial}." and calls
        for call in calls:
            if call.name == "get_weather":
                jsonschema.validate(json.loads(call.arguments), SCHEMAS[1])
            else:
                assert call.name == "noop" and json.loads(call.arguments) == {}


def test_llguidance_tokenizer_is_built_from_the_engine_tokenizer(llm):
    compiler = GrammarCompiler(llm.tokenizer, VOCAB, {2}, max_rows=2)
    assert isinstance(compiler.tokenizer, llguidance.LLTokenizer) and compiler.tokenizer.vocab_size == VOCAB
    text = 'hello {"a": 1}'
    assert compiler.tokenizer.decode_str(llm.tokenizer.encode(text, False)) == text
