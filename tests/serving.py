"""Helpers for tests that serve tiny Hugging Face checkpoints through the engine and check
them against `transformers`."""

from __future__ import annotations

import torch

from paged_jax import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def hf_greedy(reference, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def random_prompts(rng, lengths):
    return [rng.integers(3, 128, size=n).tolist() for n in lengths]


def make_llm(path, **kwargs) -> LLM:
    settings = dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_gpu_blocks_override=128,
                    attention_backend="xla", warm_up=False)
    return LLM(str(path), **{**settings, **kwargs})


def generate_ids(llm, prompts, params=GREEDY):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_blocks_free(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_blocks"]
    engine.block_manager.check_no_leaks([])
