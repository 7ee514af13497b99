"""`paged-jax serve` with no model: the embedded stdlib-llama, its chat template rendered as
Hugging Face renders it, and text that streams in several pieces equal to LLM.generate's.
Started through the console script, once for the module; every wait is bounded."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from server_process import running_server
from transformers import AutoTokenizer

from experiments import serving_bench
from paged_jax import LLM, SamplingParams
from paged_jax.server.serve import DEFAULT_MODEL

ENGINE = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=128, dtype="float32")
TIMEOUT = 120
PROMPT = "def __init__(self"
MESSAGES = [{"role": "system", "content": "Helpers for paths.\nShort ones."},
            {"role": "user", "content": "join two paths"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    flags = [x for k, v in ENGINE.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    log = tmp_path_factory.mktemp("default_server_log") / "server.log"
    with running_server([*flags, "--uvicorn-log-level", "warning"], log) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def llm():
    return LLM(str(DEFAULT_MODEL), **ENGINE, warm_up=False)


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT) as c:
        yield c


def test_the_console_script_lists_every_engine_flag():
    script = Path(sys.executable).parent / "paged-jax"
    command = [str(script)] if script.exists() else [shutil.which("paged-jax") or "paged-jax"]
    help_text = subprocess.run([*command, "serve", "--help"], capture_output=True, text=True, timeout=120,
                               check=True).stdout
    for flag in ["--block-size", "--max-num-seqs", "--max-model-len", "--dtype", "--enable-prefix-caching",
                 "--preemption-mode", "--num-gpu-blocks-override", "--seed", "--served-model-name", "--chat-template",
                 "--api-key", "--host", "--port"]:
        assert flag in help_text, flag


def test_the_embedded_model_is_served_under_its_name(client):
    assert [m.id for m in client.models.list().data] == ["stdlib-llama"]


def test_streamed_greedy_completion_equals_llm_generate_in_several_pieces(client, llm):
    [expected] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
                              use_tqdm=False)
    whole = client.completions.create(model="stdlib-llama", prompt=PROMPT, max_tokens=48, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected.outputs[0].text
    stream = client.completions.create(model="stdlib-llama", prompt=PROMPT, max_tokens=48, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces) == expected.outputs[0].text
    assert len([p for p in pieces if p]) > 1  # text arrives as it is made, not all at the end


def test_chat_uses_the_checkpoint_template_as_hugging_face_renders_it(url, client, llm):
    hf = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    ids = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    [expected] = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=32),
                              use_tqdm=False)

    async def chat():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT) as c:
            response = await c.chat.completions.create(model="stdlib-llama", messages=MESSAGES, max_tokens=32,
                                                       temperature=0)
            chunks = await c.chat.completions.create(model="stdlib-llama", messages=MESSAGES, max_tokens=32,
                                                     temperature=0, stream=True)
            return response, [chunk async for chunk in chunks]

    response, chunks = asyncio.run(asyncio.wait_for(chat(), TIMEOUT))
    assert response.usage.prompt_tokens == len(ids)
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.outputs[0].text


def test_the_serving_benchmark_drives_a_running_server(url, tmp_path):
    data = serving_bench.main(["--base-url", url, "--name", "ours", "--dataset", "random", "--num-prompts", "4",
                               "--input-len", "16", "--output-len", "8", "--rates", "50",
                               "--output", str(tmp_path / "bench")])
    (row,) = data["systems"]["ours"]["rates"]
    assert row["completed"] == 4 and row["errors"] == [] and row["short_outputs"] == 0
    assert (tmp_path / "bench.md").exists() and "cpu_s_per_1k_tokens" not in row  # no --server-pid
