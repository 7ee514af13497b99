"""What a request gets back: streamed text equal to the decoded tokens, stop strings cut
(and not emitted), stop tokens, min_tokens, max_tokens, and logprobs equal to Hugging Face's."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_checkpoints import load_reference

from paged_jax import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_with_tokenizer):
    return LLM(str(llama_with_tokenizer), max_num_seqs=4, max_num_batched_tokens=64, block_size=4,
               num_gpu_blocks_override=96, attention_backend="xla", warm_up=False)


PROMPT = "the quick brown fox"


def complete(llm, **params):
    [output] = llm.generate(PROMPT, SamplingParams(temperature=0, **params), use_tqdm=False)
    return output.outputs[0]


def test_text_is_the_decoded_tokens(llm):
    out = complete(llm, max_tokens=20, ignore_eos=True)
    tokenizer = llm.get_tokenizer()
    prompt_ids = tokenizer.encode(PROMPT)
    assert out.text == tokenizer.decode(prompt_ids + out.token_ids)[len(tokenizer.decode(prompt_ids)):]
    assert out.finish_reason == "length" and len(out.token_ids) == 20


def test_stop_string_ends_the_text_and_is_not_emitted(llm):
    full = complete(llm, max_tokens=20, ignore_eos=True)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    cut = full.text.index(stop)
    out = complete(llm, max_tokens=20, ignore_eos=True, stop=[stop, "never-appears"])
    assert out.text == full.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = complete(llm, max_tokens=20, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    assert kept.text == full.text[: cut + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    full = complete(llm, max_tokens=12, ignore_eos=True)
    stop_id = full.token_ids[2]
    first = full.token_ids.index(stop_id)
    out = complete(llm, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    tokenizer = llm.get_tokenizer()
    prompt_ids = tokenizer.encode(PROMPT)
    before_stop = tokenizer.decode(prompt_ids + out.token_ids[:-1])[len(tokenizer.decode(prompt_ids)):]
    assert out.text == before_stop  # the stop token's text is not emitted
    late = complete(llm, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=first + 3)
    assert stop_id not in late.token_ids[: first + 3]
    assert len(late.token_ids) >= first + 3


def test_logprobs_are_the_models_and_add_up(llm, llama_with_tokenizer):
    out = complete(llm, max_tokens=6, ignore_eos=True, logprobs=3)
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    with torch.no_grad():
        reference = load_reference(llama_with_tokenizer)
        logits = reference(torch.tensor([prompt_ids + out.token_ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1].numpy()
    assert len(out.logprobs) == 6
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3
        for candidate, logprob in entry.items():
            assert abs(logprob.logprob - log_probs[step, candidate]) < 1e-4
        assert sorted(e.rank for e in entry.values()) == [1, 2, 3]
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))
    assert complete(llm, max_tokens=2).cumulative_logprob is None
    only_chosen = complete(llm, max_tokens=2, logprobs=0)
    assert [list(e.values())[0].rank for e in only_chosen.logprobs] == [1, 1]  # full-vocabulary rank


def test_eos_stops_unless_ignored(llm, llama_with_tokenizer, tmp_path):
    full = complete(llm, max_tokens=12, ignore_eos=True)
    eos = full.token_ids[3]  # declare a token the model emits to be its end of sequence
    shutil.copytree(llama_with_tokenizer, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 99]}))
    llm_eos = LLM(str(tmp_path), max_num_seqs=4, max_num_batched_tokens=64, block_size=4,
                  num_gpu_blocks_override=96, attention_backend="xla", warm_up=False)
    stopped = complete(llm_eos, max_tokens=12)
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    assert complete(llm_eos, max_tokens=12, ignore_eos=True).token_ids == full.token_ids
