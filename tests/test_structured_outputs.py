"""Structured outputs and logit_bias, offline and through the server.

A tiny random model writes garbage, which is what makes a constraint visible: sampled at
temperature 1.0, every output still parses and validates against its JSON schema, is one of
its choices, matches its regular expression or is in its grammar's language, and ends where
the grammar ends. A constrained request runs single steps (its next mask is the host's to
compute) without changing what the free requests in its batch generate. The model's
tokenizer is byte-level BPE over a small corpus with JSON's characters in it (the corpus's
characters are all it can write; of whitespace only the space, since a JSON grammar allows
any run of it between values, which a random model with newline and tab tokens extends past
any max_tokens), of fewer tokens than the model's vocabulary, as a model whose embedding is
padded has. The server is started once for the module.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import openai
import pytest
from server_process import running_server
from serving import make_llm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from paged_jax import SamplingParams, StructuredOutputsParams
from paged_jax.worker.sampler import SamplerFlags, SamplingBatch, empty_batch, sample

SCHEMA = {"type": "object", "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"}}}
CHOICES = ["yes", "no", "maybe so"]
REGEX = r"[a-z]{2,5}-[0-9]{1,3}"
GRAMMAR = 'root ::= "[" item ("," item)* "]"\nitem ::= [0-9] | "null"'
GRAMMAR_LANGUAGE = r"\[([0-9]|null)(,([0-9]|null))*\]"  # GRAMMAR's, as a Python regex
CORPUS = ['{"name": "fox", "age": 42, "ok": true}', "[1, 2.5, -3e4, null, false]", "yes no maybe so",
          "the quick brown fox jumps over the lazy dog 0123456789 abc-def_ghi"] * 10
EOS = 2
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_gpu_blocks_override=256,
              attention_backend="xla")
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
TIMEOUT = 120  # seconds for any one client call


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    """The tiny llama (vocabulary 128) with a byte-level BPE tokenizer of 120 tokens, <unk>,
    <s>, </s> first."""
    directory = tmp_path_factory.mktemp("llama_json")
    shutil.copytree(checkpoint("llama"), directory, dirs_exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    (directory / "template.jinja").write_text(TEMPLATE)
    return directory


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir, num_gpu_blocks_override=256)


def sampled(spec: StructuredOutputsParams, seed: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, n=3, max_tokens=100, structured_outputs=spec, **kwargs)


CASES = {  # a spec, and what every output of it must pass
    "json": (StructuredOutputsParams(json=SCHEMA), lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
    "json_object": (StructuredOutputsParams(json_object=True), lambda text: isinstance(json.loads(text), dict)),
    "choice": (StructuredOutputsParams(choice=CHOICES), lambda text: text in CHOICES),
    "regex": (StructuredOutputsParams(regex=REGEX), lambda text: bool(re.fullmatch(REGEX, text))),
    "grammar": (StructuredOutputsParams(grammar=GRAMMAR), lambda text: bool(re.fullmatch(GRAMMAR_LANGUAGE, text))),
}


# -- the sampler ------------------------------------------------------------------------------------


def test_the_sampler_keeps_only_what_a_packed_bitmask_allows_and_logprobs_see_the_mask(rng):
    """xgrammar's layout: token v is bit v % 32 of int32 word v // 32; a vocabulary of 100
    leaves the last word part-used. Row 0 allows four tokens (63 is a sign bit), row 1 (all
    ones) every one."""
    vocab, allowed = 100, [5, 37, 63, 99]
    words = np.full((2, 4), 0xFFFFFFFF, np.uint32)
    words[0] = 0
    for token in allowed:
        words[0, token // 32] |= np.uint32(1 << (token % 32))
    bitmask = words.view(np.int32)
    logits = jnp.asarray(rng.normal(size=(2, vocab)), jnp.float32)
    batch = empty_batch(2)
    batch.update(bitmask=bitmask, temperature=np.ones(2, np.float32))
    flags = SamplerFlags(sample=True, filter=False, adjust=False, logprobs=True, mask=True)
    drawn = {int(sample(logits, SamplingBatch(**{**batch, "counters": np.full(2, i, np.int32)}), flags).tokens[0])
             for i in range(40)}
    assert drawn <= set(allowed) and len(drawn) > 1
    out = sample(logits, SamplingBatch(**batch), flags)
    assert sorted(np.asarray(out.top_ids[0, :4]).tolist()) == allowed
    np.testing.assert_allclose(np.exp(np.asarray(out.top_logprobs[0, :4])).sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.top_logprobs[1]), np.sort(jax.nn.log_softmax(logits[1]))[::-1][:20],
                               rtol=1e-5)


# -- offline ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CASES)
def test_every_sampled_output_follows_its_grammar_and_ends_with_it(llm, kind):
    spec, valid = CASES[kind]
    [output] = llm.generate(["the quick"], sampled(spec, seed=7), use_tqdm=False)
    assert output.error is None
    for choice in output.outputs:
        assert valid(choice.text), choice.text
        assert choice.finish_reason == "stop" and choice.token_ids[-1] == EOS


def test_free_requests_generate_the_same_beside_constrained_ones(llm):
    """Greedy requests alone run in decode loops; beside constrained ones, every step is a
    single step and the mask and bias variants of the sampler run: the tokens stay the same."""
    prompts = [[1, 5, 9, 30], [1, 44, 45], [1, 70, 71, 72, 73]]
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": p} for p in prompts], free, use_tqdm=False)
    kinds = ["json", "choice", "regex"]
    constrained = [sampled(CASES[kind][0], seed=i) for i, kind in enumerate(kinds)]
    biased = SamplingParams(temperature=0, max_tokens=8, logit_bias={60: 5.0})
    mixed = llm.generate([{"prompt_token_ids": p} for p in prompts] + ["the"] * 4,
                         [free] * len(prompts) + constrained + [biased], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[: len(prompts)]] == [o.outputs[0].token_ids for o in alone]
    for kind, output in zip(kinds, mixed[len(prompts):]):
        assert all(CASES[kind][1](c.text) for c in output.outputs), kind


def test_a_finished_grammar_ends_the_output_even_with_ignore_eos(llm):
    [output] = llm.generate(["a"], sampled(StructuredOutputsParams(regex="[0-9]{3}"), seed=3, ignore_eos=True),
                            use_tqdm=False)
    for choice in output.outputs:
        assert re.fullmatch("[0-9]{3}", choice.text)
        assert choice.finish_reason == "stop" and choice.token_ids[-1] == EOS


def test_logit_bias_of_100_makes_greedy_pick_the_token_and_minus_100_bans_it(llm):
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    [free] = llm.generate(["the"], SamplingParams(**greedy), use_tqdm=False)
    favourite = free.outputs[0].token_ids[0]
    [banned, forced] = llm.generate(["the"] * 2, [SamplingParams(**greedy, logit_bias={favourite: -100}),
                                                  SamplingParams(**greedy, logit_bias={17: 100})], use_tqdm=False)
    assert favourite not in banned.outputs[0].token_ids
    assert forced.outputs[0].token_ids == [17] * 6


@pytest.mark.parametrize("make, field", [
    (lambda: StructuredOutputsParams(), "needs exactly one of json, regex, choice, grammar, json_object, got none"),
    (lambda: StructuredOutputsParams(json=SCHEMA, regex="a"), "got json and regex"),
    (lambda: StructuredOutputsParams(choice=[]), "StructuredOutputsParams.choice"),
    (lambda: StructuredOutputsParams(regex=5), "StructuredOutputsParams.regex"),
    (lambda: SamplingParams(logit_bias={3: float("nan")}), "SamplingParams.logit_bias"),
    (lambda: SamplingParams(logit_bias={-1: 1.0}), "SamplingParams.logit_bias"),
    (lambda: SamplingParams(structured_outputs={"json": SCHEMA}), "SamplingParams.structured_outputs"),
])
def test_malformed_parameters_are_value_errors_naming_the_field(make, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        make()


@pytest.mark.parametrize("params, field", [
    (SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": 5})), "StructuredOutputsParams.json"),
    (SamplingParams(structured_outputs=StructuredOutputsParams(json="{not json")), "StructuredOutputsParams.json"),
    (SamplingParams(structured_outputs=StructuredOutputsParams(regex="(a")), "StructuredOutputsParams.regex"),
    (SamplingParams(structured_outputs=StructuredOutputsParams(grammar='rule ::= "a"')),
     "StructuredOutputsParams.grammar"),
    (SamplingParams(logit_bias={128: 1.0}), "logit_bias"),
])
def test_a_request_with_an_invalid_grammar_fails_alone_naming_the_field(llm, params, field):
    bad, good = llm.generate(["the", "the"], [params, SamplingParams(max_tokens=3)], use_tqdm=False)
    assert field in bad.error and not bad.outputs
    assert good.error is None and len(good.outputs[0].token_ids) == 3


def test_without_xgrammar_a_constrained_request_fails_alone_naming_the_extra(llm, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar raises ImportError
    bad, good = llm.generate(["the", "the"], [sampled(CASES["choice"][0], seed=1), SamplingParams(max_tokens=3)],
                             use_tqdm=False)
    assert "pip install 'paged-jax[structured]'" in bad.error
    assert good.error is None


# -- the server ------------------------------------------------------------------------------------


@contextlib.contextmanager
def served(model_dir, chat_template: str, tmp_path_factory):
    """The test model behind a real server with this chat template file, and a client of it."""
    flags = [x for k, v in ENGINE.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    args = [str(model_dir), "--served-model-name", "tiny", "--chat-template", str(model_dir / chat_template),
            "--uvicorn-log-level", "warning", *flags]
    log = tmp_path_factory.mktemp("server_log") / "server.log"
    with running_server(args, log) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    with served(model_dir, "template.jinja", tmp_path_factory) as c:
        yield c


SAMPLING = dict(model="tiny", temperature=1.0, seed=5, max_tokens=100)


def chat(client, stream: bool, **kwargs) -> str:
    response = client.chat.completions.create(messages=[{"role": "user", "content": "the quick"}], stream=stream,
                                              **{**SAMPLING, **kwargs})
    if not stream:
        assert response.choices[0].finish_reason == "stop"
        return response.choices[0].message.content
    return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)


def complete(client, stream: bool, **kwargs) -> str:
    response = client.completions.create(prompt="the quick", stream=stream, **{**SAMPLING, **kwargs})
    if not stream:
        assert response.choices[0].finish_reason == "stop"
        return response.choices[0].text
    return "".join(chunk.choices[0].text for chunk in response if chunk.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_in_chat_and_completions(client, stream):
    """The official client sends response_format in chat; in completions, vLLM's extension, as extra_body."""
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    jsonschema.validate(json.loads(chat(client, stream, response_format=response_format)), SCHEMA)
    jsonschema.validate(json.loads(complete(client, stream, extra_body={"response_format": response_format})), SCHEMA)
    assert isinstance(json.loads(chat(client, stream, response_format={"type": "json_object"})), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_choice_and_regex_in_chat_and_completions(client, stream):
    for ask in (chat, complete):
        assert ask(client, stream, extra_body={"structured_outputs": {"choice": CHOICES}}) in CHOICES
        assert re.fullmatch(REGEX, ask(client, stream, extra_body={"structured_outputs": {"regex": REGEX}}))


def test_logit_bias_keys_are_token_ids_as_strings(client, model_dir):
    token = Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id("fo")
    response = client.completions.create(prompt="the quick", **{**SAMPLING, "temperature": 0, "max_tokens": 3},
                                         logit_bias={str(token): 1e6})  # clamped to 100
    assert response.choices[0].text == "fofofo"


@pytest.mark.parametrize("kwargs, param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}),
     "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema"),
    (dict(extra_body={"structured_outputs": {"regex": "(a"}}), "structured_outputs.regex"),
    (dict(extra_body={"structured_outputs": {"grammar": "root ::= x"}}), "structured_outputs.grammar"),
    (dict(extra_body={"structured_outputs": {"choice": []}}), "structured_outputs.choice"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["a"]}}), "structured_outputs"),
    (dict(response_format={"type": "json_object"}, extra_body={"structured_outputs": {"regex": "a"}}),
     "structured_outputs"),
    (dict(logit_bias={"fo": 1}), "logit_bias"),
    (dict(logit_bias={"128": 1}), "logit_bias"),
])
def test_an_invalid_constraint_is_a_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, False, **kwargs)
    assert error.value.body["param"] == param, error.value.body
