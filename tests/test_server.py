"""The OpenAI-compatible server, as a real subprocess on 127.0.0.1, driven by the official
`openai` client (sync and async) and by httpx: what it generates equals the offline LLM,
streams join to the same text, concurrent clients are batched, a dropped client frees its
blocks, the API key is enforced, malformed bodies get 4xx (never 500) and /metrics counts
the work done. One server per module (starting one compiles the model's steps); every wait
is bounded. The embedded model's server is in test_server_default_model.py."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import time

import httpx
import openai
import pytest
from hf_checkpoints import save_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import running_server, scrape, wait_until

from paged_jax import LLM, SamplingParams

NAME = "tiny-llama"
KEY = "test-key-123"
MAX_MODEL_LEN = 128
MAX_NUM_SEQS = 8
MAX_BODY = 64 * 1024
ENGINE = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=64, block_size=4,
              num_gpu_blocks_override=256, attention_backend="xla")
TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}the{% endif %}")
PROMPTS = ["the quick brown fox", "a paged cache of keys", "serving large language models", "lazy dog"]
TIMEOUT = 120  # seconds for any one client call


def _flags(engine: dict) -> list[str]:
    return [x for k, v in engine.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_server")
    shutil.copytree(checkpoint("llama"), directory, dirs_exist_ok=True)
    save_tokenizer(directory)
    (directory / "template.jinja").write_text(TEMPLATE)
    return directory


@pytest.fixture(scope="module")
def url(model_dir, tmp_path_factory):
    args = [str(model_dir), "--served-model-name", NAME, "--chat-template", str(model_dir / "template.jinja"),
            "--max-body-size", str(MAX_BODY), "--uvicorn-log-level", "warning",
            *_flags(ENGINE)]
    log = tmp_path_factory.mktemp("server_log") / "server.log"
    with running_server(args, log, env={"PAGED_JAX_API_KEY": KEY}) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def llm(model_dir):
    """The offline reference, with the server's settings."""
    return LLM(str(model_dir), **ENGINE, warm_up=False)


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=TIMEOUT, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def reference_texts(llm, prompts, max_tokens: int) -> list[str]:
    return [o.outputs[0].text for o in llm.generate(prompts, greedy(max_tokens), use_tqdm=False)]


def assert_idle(url: str) -> dict[str, float]:
    """Every request finished and every block back (bounded wait: aborts land between steps)."""
    assert wait_until(lambda: (m := scrape(url))["vllm:num_requests_running"] == 0
                      and m["vllm:kv_cache_usage_perc"] == 0.0, timeout=30), scrape(url)
    return scrape(url)


# -- the plain endpoints ---------------------------------------------------------------------------


def test_models_health_version_and_tokenizer_endpoints(client, http, llm):
    [model] = client.models.list().data
    assert model.id == NAME
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    tokenizer = llm.get_tokenizer()
    tokens = http.post("/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert tokens["tokens"] == tokenizer.encode(PROMPTS[0]) and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == \
        tokenizer.decode(tokens["tokens"])


def test_the_api_key_guards_v1_and_only_v1(url):
    body = {"model": NAME, "prompt": "the", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=TIMEOUT)
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{url}/v1/models", headers=headers, timeout=TIMEOUT).status_code == 401
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=TIMEOUT).status_code == 200
    good = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=TIMEOUT)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 1


# -- completions and chat ---------------------------------------------------------------------------


def test_greedy_completions_equal_llm_generate(client, llm):
    expected = reference_texts(llm, PROMPTS, 16)
    for prompt, text in zip(PROMPTS, expected):
        response = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert response.choices[0].text == text
        assert response.choices[0].finish_reason == "length"
        assert response.usage.completion_tokens == 16
        assert response.usage.prompt_tokens == len(llm.get_tokenizer().encode(prompt))
    # A list of prompts: one choice each, in order; token-id prompts too.
    response = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == expected
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS[:2]]
    response = client.completions.create(model=NAME, prompt=ids, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == expected[:2]
    echoed = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPTS[0] + expected[0]


def test_streamed_pieces_join_to_the_same_text(client, llm):
    [expected] = reference_texts(llm, [PROMPTS[2]], 24)
    stream = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    # (How many pieces depends on how often the event loop gets the GIL between this tiny
    # model's 2 ms steps; the embedded model's test checks that text comes in several.)
    assert "".join(pieces) == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices


def test_stop_strings_are_cut_in_streams_as_in_llm(client, llm):
    [full] = reference_texts(llm, [PROMPTS[0]], 24)
    stop = full[len(full) // 3: len(full) // 3 + 3]  # a stop string the output surely contains
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    [expected] = llm.generate([PROMPTS[0]], params, use_tqdm=False)
    stream = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop],
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == expected.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "stop" and stop not in expected.outputs[0].text


def test_logprobs_and_n(client):
    response = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3,
                                         extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    for sampled, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 4 and sampled == pytest.approx(max(top.values()))  # greedy: the best
    sampled = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=5, n=3, temperature=1.0, seed=7,
                                        extra_body={"ignore_eos": True})
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    assert sampled.usage.completion_tokens == 15


def test_echo_with_logprobs_scores_the_prompt_as_llm_does_streamed_or_not(client, llm):
    """What a loglikelihood client (lm-eval's local-completions) sends: echo and logprobs, with
    max_tokens 0 for the prompt alone (as vLLM allows). The prompt's first token has no
    logprob; text offsets run over the tokens' texts, and a stream's chunks join to the same."""
    prompt, max_tokens = PROMPTS[2], 12
    ids = llm.get_tokenizer().encode(prompt)
    [offline] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                                      logprobs=2, prompt_logprobs=2), use_tqdm=False)
    completion = offline.outputs[0]
    scored = list(zip(ids[1:], offline.prompt_logprobs[1:])) + list(zip(completion.token_ids, completion.logprobs))
    expected = [entry[token].logprob for token, entry in scored]
    expected_top = [{lp.decoded_token: lp.logprob for lp in entry.values()} for _, entry in scored]  # top 2 and own
    for generated in (max_tokens, 0):
        request = dict(model=NAME, prompt=prompt, max_tokens=generated, temperature=0, echo=True, logprobs=2,
                       extra_body={"ignore_eos": True})
        whole = client.completions.create(**request).choices[0]
        assert whole.text == prompt + (completion.text if generated else "")
        logprobs = whole.logprobs
        assert len(logprobs.tokens) == len(ids) + generated
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert logprobs.token_logprobs[1:] == pytest.approx(expected[: len(ids) + generated - 1], abs=1e-5)
        for top, offline_top in zip(logprobs.top_logprobs[1:], expected_top):
            assert top == pytest.approx(offline_top, abs=1e-5)
        assert logprobs.text_offset == list(itertools.accumulate(map(len, logprobs.tokens[:-1]), initial=0))
        chunks = [c.choices[0] for c in client.completions.create(**request, stream=True) if c.choices]
        assert "".join(c.text for c in chunks) == whole.text
        streamed = {field: sum((getattr(c.logprobs, field) for c in chunks), [])
                    for field in ("tokens", "text_offset", "token_logprobs", "top_logprobs")}
        assert streamed["tokens"] == logprobs.tokens and streamed["text_offset"] == logprobs.text_offset
        assert streamed["token_logprobs"][1:] == pytest.approx(logprobs.token_logprobs[1:], abs=1e-5)
        for top, whole_top in zip(streamed["top_logprobs"][1:], logprobs.top_logprobs[1:]):
            assert top == pytest.approx(whole_top, abs=1e-5)
    with pytest.raises(openai.BadRequestError):  # max_tokens 0 without echo: nothing asked for
        client.completions.create(model=NAME, prompt=prompt, max_tokens=0)


def test_chat_equals_llm_on_the_rendered_prompt(url, client, http, llm):
    messages = [{"role": "system", "content": "the lazy dog"}, {"role": "user", "content": "a quick fox"}]
    rendered = "the lazy dog a quick fox the"  # TEMPLATE by hand
    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert ids == llm.get_tokenizer().encode(rendered, add_special_tokens=False)
    [expected] = llm.generate([{"prompt_token_ids": ids}], greedy(12), use_tqdm=False)
    response = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
    assert len(choice.logprobs.content) == 12 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert response.usage.prompt_tokens == len(ids)

    async def stream():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT) as c:
            chunks = await c.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True})
            return [chunk async for chunk in chunks]

    chunks = asyncio.run(asyncio.wait_for(stream(), TIMEOUT))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    bad = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "tool", "content": "x"}]})
    assert bad.status_code == 400 and "unknown role tool" in bad.json()["error"]["message"]


# -- many clients, dropped clients ------------------------------------------------------------------


def test_32_concurrent_streaming_clients_are_batched_and_all_finish(url, llm):
    """Clients on different connections share steps: when the first stream ends, several have
    had tokens (served one after another, each would start only as the one before ends). Read
    from the streams themselves, so a server too busy to answer a metrics poll cannot hide it."""
    prompts = [f"{PROMPTS[i % 4]} {PROMPTS[(i // 4) % 4]}" for i in range(32)]
    expected = reference_texts(llm, prompts, 24)
    before = scrape(url)

    async def one(c, prompt):
        stream = await c.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        texts, arrivals = [], []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                texts.append(chunk.choices[0].text)
                arrivals.append(time.monotonic())
        return "".join(texts), arrivals[0], arrivals[-1]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    results = asyncio.run(asyncio.wait_for(main(), 4 * TIMEOUT))
    assert [text for text, _, _ in results] == expected
    first_end = min(last for _, _, last in results)
    assert sum(first < first_end for _, first, _ in results) > 1
    after = assert_idle(url)
    assert after["vllm:request_success_total{finished_reason=length}"] - \
        before.get("vllm:request_success_total{finished_reason=length}", 0) == 32


def test_a_client_that_drops_mid_stream_frees_its_blocks_at_once(url, llm):
    [expected] = reference_texts(llm, [PROMPTS[1]], 40)
    before = scrape(url)
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}

    async def dropper(h: httpx.AsyncClient, dropped: asyncio.Event):
        async with h.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
            lines = 0
            async for line in response.aiter_lines():
                lines += line.startswith("data: {")
                if lines == 2:
                    break  # leaves the block: the connection is closed with ~98 tokens to go
        dropped.set()

    async def survivor(c):
        stream = await c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=40, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def main():
        dropped = asyncio.Event()
        async with httpx.AsyncClient(timeout=TIMEOUT) as h, \
                openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT) as c:
            return await asyncio.gather(dropper(h, dropped), survivor(c))

    _, text = asyncio.run(asyncio.wait_for(main(), 2 * TIMEOUT))
    assert text == expected
    after = assert_idle(url)
    assert after["vllm:request_success_total{finished_reason=abort}"] - \
        before.get("vllm:request_success_total{finished_reason=abort}", 0) == 1
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated < 40 + 100  # the dropped request did not run to its max_tokens


# -- bad input ---------------------------------------------------------------------------------------


def test_client_mistakes_are_4xx_with_openai_error_objects(http):
    def error(response, status):
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        return body

    assert error(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404)["param"] == "model"
    assert error(http.post("/v1/completions", json={"model": NAME, "prompt": "the " * 200}), 400)["param"] == "prompt"
    assert error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1000}), 400)["param"] == "max_tokens"
    assert error(http.post("/v1/completions", json={"prompt": "x", "temperature": "hot"}), 400)["param"] == \
        "temperature"
    assert error(http.post("/v1/completions", json={"prompt": "x", "top_p": 1.5}), 400)["param"] == "top_p"
    assert error(http.post("/v1/completions", json={"prompt": [1, 2, 999]}), 400)["param"] == "prompt"
    assert error(http.post("/v1/completions", json={"prompt": "x", "n": MAX_NUM_SEQS + 1}), 400)["param"] == "n"
    assert error(http.post("/v1/completions", content=b'{"prompt": "x",',
                           headers={"content-type": "application/json"}), 400)["param"] is None
    assert error(http.post("/v1/chat/completions", json={"messages": []}), 400)["param"] == "messages"
    assert error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                         "top_logprobs": 2}), 400)["param"] == "top_logprobs"
    assert error(http.post("/v1/completions", content=b"x" * (MAX_BODY + 1),
                           headers={"content-type": "application/json"}), 413)
    assert error(http.get("/v1/nothing-here"), 404)
    assert http.post("/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200


def create(client, endpoint: str, **fields):
    """A short completion or chat completion with `fields` added."""
    if endpoint == "completions":
        return client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=2, **fields)
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=2, **fields)


REFUSED = [  # (endpoint, fields added to a good request, the field the 400 names)
    ("completions", {"suffix": " over the lazy dog"}, "suffix"),
    ("completions", {"n": 2, "best_of": 3}, "best_of"),
    ("completions", {"temprature": 0.5}, "temprature"),  # a misspelling: no field of OpenAI's or vLLM's
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"use_beam_search": True}, "use_beam_search"),  # vLLM's
    ("chat", {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}]},
     "messages.0.content.0.cache_control"),
]


@pytest.mark.parametrize(("endpoint", "fields", "param"), REFUSED)
def test_a_field_the_server_does_not_implement_is_a_400_naming_it(client, endpoint, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        create(client, endpoint, extra_body=fields)
    assert refused.value.param == param and param in refused.value.body["message"]


def test_suffix_is_refused_in_vllm_words_and_best_of_only_above_n(http):
    refused = http.post("/v1/completions", json={**GOOD, "suffix": "x"})
    assert refused.status_code == 400
    assert refused.json() == {"error": {"message": "suffix is not currently supported", "type": "invalid_request_error",
                                        "param": "suffix", "code": None}}
    best_of = http.post("/v1/completions", json={**GOOD, "n": 2, "best_of": 3}).json()["error"]
    assert best_of["param"] == "best_of" and "best_of 3 is not supported" in best_of["message"]


def test_fields_that_change_nothing_or_are_null_are_accepted(client, http):
    response = create(client, "chat", user="alice", store=False, n=2, extra_body={"best_of": 2})
    assert len(response.choices) == 2 and response.usage.completion_tokens == 4
    response = create(client, "completions", user="alice", best_of=1)
    assert response.usage.completion_tokens == 2
    nulls = http.post("/v1/completions", json={**GOOD, "suffix": None, "use_beam_search": None})
    assert nulls.status_code == 200, nulls.text


TEXT = st.text(alphabet="abcxyz ", min_size=1, max_size=8)  # never a number
NOT_INT = st.one_of(TEXT, st.booleans(), st.floats(), st.lists(st.integers(), max_size=2), st.none().map(lambda _: {}))
NOT_NUMBER = st.one_of(TEXT, st.booleans(), st.lists(st.floats(), max_size=2), st.just({"x": 1}),
                       st.sampled_from([float("nan"), float("inf"), -float("inf")]))
INVALID = {  # field -> values that make an otherwise good request invalid
    "model": TEXT.map(lambda s: f"no-{s}"),
    "prompt": st.one_of(st.just([]), st.just([[]]), st.integers(), st.booleans(), st.just({"a": 1}),
                        st.lists(st.integers(min_value=128, max_value=2**62), min_size=1, max_size=3),
                        st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                        st.lists(st.booleans(), min_size=1, max_size=3), st.just([1, "a"])),
    "max_tokens": st.one_of(NOT_INT, st.integers(max_value=0), st.integers(min_value=MAX_MODEL_LEN)),
    "temperature": st.one_of(NOT_NUMBER, st.floats(max_value=-1e-6, allow_infinity=False)),
    "top_p": st.one_of(NOT_NUMBER, st.floats(min_value=1.001, allow_infinity=False), st.floats(max_value=0.0)),
    "top_k": st.one_of(NOT_INT, st.integers(max_value=-2)),
    "min_p": st.one_of(NOT_NUMBER, st.floats(min_value=1.001, allow_infinity=False)),
    "n": st.one_of(NOT_INT, st.integers(max_value=0), st.integers(min_value=MAX_NUM_SEQS + 1)),
    "presence_penalty": st.one_of(NOT_NUMBER, st.floats(min_value=2.001, allow_infinity=False)),
    "frequency_penalty": st.one_of(NOT_NUMBER, st.floats(max_value=-2.001, allow_infinity=False)),
    "repetition_penalty": st.one_of(NOT_NUMBER, st.floats(max_value=0.0, allow_infinity=False)),
    "logprobs": st.one_of(NOT_INT, st.integers(max_value=-1), st.integers(min_value=21)),
    "stop": st.one_of(st.integers(), st.just([""]), st.lists(st.integers(), min_size=1, max_size=2)),
    "seed": NOT_INT,
    "stream": st.one_of(TEXT, st.integers(), st.just([True])),
    "echo": st.one_of(TEXT, st.integers()),
    "min_tokens": st.one_of(NOT_INT, st.integers(max_value=-1), st.integers(min_value=3)),
    "stream_options": st.one_of(st.integers(), st.just({"include_usage": "yes"})),
}
GOOD = {"model": NAME, "prompt": "the quick", "max_tokens": 2, "temperature": 0}
CHAT_INVALID = st.fixed_dictionaries({"messages": st.one_of(
    st.just([]), TEXT, st.just([{"content": "x"}]), st.just([{"role": 1, "content": "x"}]),
    st.just([{"role": "user", "content": [{"type": "image_url"}]}]), st.just([{"role": "robot", "content": "x"}]))})
NOT_AN_OBJECT = st.one_of(st.integers(), TEXT, st.lists(st.integers(), max_size=3), st.none()).map(json.dumps)
GARBAGE = st.binary(min_size=1, max_size=64).filter(lambda b: not _is_json(b))


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


BODIES = st.one_of(
    st.sampled_from(sorted(INVALID)).flatmap(
        lambda f: INVALID[f].map(lambda v: ("/v1/completions", f, {**GOOD, f: v}))),
    CHAT_INVALID.map(lambda body: ("/v1/chat/completions", "messages", body)),
    NOT_AN_OBJECT.map(lambda s: ("/v1/completions", None, s.encode())),
    GARBAGE.map(lambda b: ("/v1/chat/completions", None, b)),
)


def test_malformed_bodies_get_4xx_never_500_and_the_server_carries_on(http):
    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(BODIES)
    def check(case):
        path, field, body = case
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = http.post(path, content=content, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
        error = response.json()["error"]
        assert error["message"]
        if field is not None and response.status_code == 400:
            assert error["param"] is not None and error["param"].split(".")[0] == field, (body, error)

    check()
    assert http.get("/health").status_code == 200
    good = http.post("/v1/completions", json={**GOOD, "max_tokens": 3})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 3


# -- metrics -------------------------------------------------------------------------------------------


def test_metrics_parse_and_count_the_work_done(url, client):
    names = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_requests_swapped",
             "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
             "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
             "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
             "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count"]
    before = assert_idle(url)
    assert all(name in before for name in names), sorted(set(names) - set(before))
    usages = [client.completions.create(model=NAME, prompt=p, max_tokens=7, temperature=0,
                                        extra_body={"ignore_eos": True}).usage for p in PROMPTS]
    after = assert_idle(url)

    def delta(name):
        return after[name] - before.get(name, 0.0)

    assert delta("vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("vllm:generation_tokens_total") == sum(u.completion_tokens for u in usages) == 4 * 7
    assert delta("vllm:prefix_cache_queries_total") == sum(u.prompt_tokens for u in usages)
    for name in ["vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:request_success_total{finished_reason=length}"]:
        assert delta(name) == 4, name
    assert delta("vllm:inter_token_latency_seconds_count") == 4 * 6  # the tokens after each first one
    assert delta("vllm:e2e_request_latency_seconds_sum") >= delta("vllm:time_to_first_token_seconds_sum") > 0
