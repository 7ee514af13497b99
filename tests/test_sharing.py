"""Memory sharing in the engine (§4.4 of the paper): parallel samples share their prompt's
blocks, beams fork and free blocks with copy-on-write, requests share cached prefixes. Sharing
changes what memory holds and never what comes out: outputs are the same with it on and off,
and beam search equals Hugging Face's."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from hf_checkpoints import load_reference
from serving import GREEDY, assert_all_blocks_free, hf_greedy, make_llm, random_prompts

from paged_jax import BeamSearchParams, SamplingParams
from paged_jax.sequence import Sequence


def completions(outputs):
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outputs]


# -- parallel sampling -------------------------------------------------------------------------

def test_parallel_samples_share_the_prompt_and_equal_copying_it(checkpoint, rng):
    path = checkpoint("llama")
    prompts = random_prompts(rng, [13, 30, 6, 21])  # block 4: most end mid-block, so forks copy on write
    params = [SamplingParams(n=4, temperature=1.0, max_tokens=9, seed=11, ignore_eos=True),
              SamplingParams(n=3, temperature=0.8, top_p=0.9, max_tokens=12, seed=5, ignore_eos=True),
              SamplingParams(n=1, temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True)]
    runs, stats = {}, {}
    for sharing in (True, False):
        llm = make_llm(path, enable_block_sharing=sharing)
        runs[sharing] = completions(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
        stats[sharing] = llm.stats()
        assert_all_blocks_free(llm)
    assert runs[True] == runs[False]
    assert len({tuple(t) for t, _ in runs[True][0]}) == 4  # the seeded samples differ
    assert runs[True][3][0] == runs[True][3][1]  # greedy samples agree
    assert runs[True][3][0][0] == hf_greedy(load_reference(path), prompts[3], 10)
    assert stats[True]["block_sharing_saving"] > 0.2
    assert stats[False]["block_sharing_saving"] == 0
    assert 0 < stats[True]["num_copied_blocks"] < stats[False]["num_copied_blocks"]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_parallel_samples_survive_preemption(checkpoint, rng, mode):
    path = checkpoint("qwen2")
    prompts = random_prompts(rng, [10, 7, 15])
    params = SamplingParams(n=3, temperature=1.0, max_tokens=14, seed=2, ignore_eos=True)
    roomy = completions(make_llm(path).generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    llm = make_llm(path, num_gpu_blocks_override=24, preemption_mode=mode, swap_space=0.01)
    tight = completions(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    assert tight == roomy
    assert llm.stats()["num_preemptions"] > 0
    assert_all_blocks_free(llm)


# -- beam search -------------------------------------------------------------------------------

def with_eos(checkpoint_dir, eos: int, directory):
    """A copy of a checkpoint whose EOS is `eos`."""
    for file in checkpoint_dir.iterdir():
        shutil.copy(file, directory / file.name)
    for name in ("config.json", "generation_config.json"):
        if (directory / name).is_file():
            config = json.loads((directory / name).read_text())
            config["eos_token_id"] = eos
            (directory / name).write_text(json.dumps(config))
    return directory


def hf_beam_search(reference, prompt, params: BeamSearchParams, eos: int) -> list[list[int]]:
    ids = torch.tensor([prompt])
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), num_beams=params.beam_width,
                             num_return_sequences=params.beam_width, do_sample=False,
                             max_new_tokens=params.max_tokens, early_stopping=params.early_stopping,
                             length_penalty=params.length_penalty, eos_token_id=eos, pad_token_id=eos)
    beams = []
    for row in out[:, len(prompt):].tolist():
        beams.append(row[: row.index(eos) + 1] if eos in row else row)  # HF pads after the EOS
    return beams


@pytest.mark.parametrize("variant, width, length_penalty, early_stopping, max_tokens", [
    ("llama", 4, 1.0, False, 12),
    ("gpt2", 3, 0.5, True, 10),
    ("opt", 2, 2.0, "never", 9),
    ("mistral", 5, 1.0, True, 7),
])
def test_beam_search_equals_hf(checkpoint, rng, tmp_path, variant, width, length_penalty, early_stopping,
                               max_tokens):
    """Our beam search is Hugging Face's rule (beam_search.py), with one EOS id and no logits
    processors: the same search, so the same hypotheses in the same order. The EOS is one of the
    model's favourite tokens that ends some hypotheses, so that the stopping rules matter."""
    reference = load_reference(checkpoint(variant))
    prompts = random_prompts(rng, [6, 17, 3])
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty,
                              early_stopping=early_stopping, include_stop_str_in_output=True)
    favourites = [t for t, _ in Counter(t for p in prompts for t in hf_greedy(reference, p, 8)).most_common(5)]
    eos = next(t for t in favourites  # one that ends some of Hugging Face's hypotheses
               if any(beam[-1:] == [t] for p in prompts for beam in hf_beam_search(reference, p, params, t)))
    llm = make_llm(with_eos(checkpoint(variant), eos, tmp_path), max_num_seqs=16)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    finished_by_eos = 0
    for prompt, output in zip(prompts, outputs):
        ours = [seq.tokens[len(prompt):] for seq in output.sequences]
        assert ours == hf_beam_search(reference, prompt, params, eos)
        assert all(seq.tokens[: len(prompt)] == prompt for seq in output.sequences)
        scores = [s.cum_logprob / len(t) ** length_penalty for s, t in zip(output.sequences, ours)]
        assert scores == sorted(scores, reverse=True)
        finished_by_eos += sum(s.finish_reason == "stop" for s in output.sequences)
    assert finished_by_eos > 0
    assert llm.stats()["num_copied_blocks"] > 0  # beams forked mid-block and were copied on write
    assert_all_blocks_free(llm)


def test_beam_search_is_the_same_with_copies_or_a_prefix_cache(checkpoint, rng):
    path = checkpoint("llama")
    stem = random_prompts(rng, [9])[0]
    prompts = [stem + [7, 8], stem[:5] + [3]]  # the second reuses the first's first block when cached
    params = BeamSearchParams(beam_width=4, max_tokens=10)
    runs, stats = {}, {}
    for name, options in {"shared": {}, "copied": dict(enable_block_sharing=False),
                          "prefix cache": dict(enable_prefix_caching=True)}.items():
        llm = make_llm(path, max_num_seqs=16, **options)
        runs[name] = [[(s.tokens, s.finish_reason)
                       for s in llm.beam_search({"prompt_token_ids": p}, params)[0].sequences]
                      for p in prompts]
        stats[name] = llm.stats()
        assert_all_blocks_free(llm)
    assert runs["shared"] == runs["copied"] == runs["prefix cache"]
    assert stats["shared"]["block_sharing_saving"] > 0.3 and stats["copied"]["block_sharing_saving"] == 0
    assert stats["prefix cache"]["prefix_cache_hit_rate"] > 0


def test_beam_search_runs_beside_sampling_and_bad_beam_widths_fail_alone(checkpoint, rng):
    llm = make_llm(checkpoint("gpt2"), max_num_seqs=16)
    engine = llm.engine
    prompts = random_prompts(rng, [8, 12])
    engine.add_request("beams", {"prompt_token_ids": prompts[0]}, BeamSearchParams(beam_width=3, max_tokens=6))
    engine.add_request("sample", {"prompt_token_ids": prompts[1]}, SamplingParams(n=2, max_tokens=6, seed=1))
    with pytest.raises(ValueError, match="beam_width 11 needs the top 22 tokens"):
        engine.add_request("wide", {"prompt_token_ids": prompts[1]}, BeamSearchParams(beam_width=11, max_tokens=6))
    with pytest.raises(ValueError, match="BeamSearchParams.early_stopping"):
        BeamSearchParams(beam_width=2, max_tokens=4, early_stopping="sometimes")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert len(done["beams"].outputs) == 3 and len(done["sample"].outputs) == 2
    assert_all_blocks_free(llm)


# -- prefix caching ----------------------------------------------------------------------------

def test_prefix_caching_computes_a_shared_prefix_once_and_changes_no_output(checkpoint, rng):
    path = checkpoint("llama")
    prefix = random_prompts(rng, [22])[0]  # 5 full blocks of 4, and 2 tokens
    prompts = [prefix + tail for tail in random_prompts(rng, [3, 9, 1, 14])]
    params = [GREEDY, SamplingParams(temperature=1.0, max_tokens=8, seed=3, ignore_eos=True),
              SamplingParams(n=2, temperature=0.9, max_tokens=6, seed=4, ignore_eos=True), GREEDY]
    runs = {}
    for caching in (False, True):
        llm = make_llm(path, enable_prefix_caching=caching)
        first = llm.generate({"prompt_token_ids": prompts[0]}, params[0], use_tqdm=False)
        rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params[1:], use_tqdm=False)
        runs[caching] = completions(first + rest)
        assert_all_blocks_free(llm)  # idle cached blocks count as free
        if caching:
            assert [o.num_cached_tokens for o in first + rest] == [0, 20, 20, 20]
            assert llm.stats()["prefix_cache_hit_rate"] == pytest.approx(60 / sum(map(len, prompts)))
    assert runs[True] == runs[False]
    assert runs[True][3][0][0] == hf_greedy(load_reference(path), prompts[3], 10)


def test_a_prompt_cached_whole_still_computes_its_last_token(checkpoint, rng):
    llm = make_llm(checkpoint("gpt2"), enable_prefix_caching=True)
    prompt = random_prompts(rng, [16])[0]  # exactly 4 blocks
    first = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    again = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 12  # 3 blocks: the 16th token is computed for its logits
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_prefix_caching_under_eviction_and_preemption_equals_hf(checkpoint, rng):
    """A cache of 30 blocks for prompts that share prefixes: cached blocks are evicted
    (sometimes mid-prefix) and requests preempted, and every output is still HF's."""
    path = checkpoint("opt")
    stems = random_prompts(rng, [12, 9])
    prompts = [stems[i % 2][: 5 + i] + tail for i, tail in enumerate(random_prompts(rng, [3, 6, 2, 8, 5, 1, 7, 4]))]
    llm = make_llm(path, enable_prefix_caching=True, num_gpu_blocks_override=30, max_num_seqs=4)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    reference = load_reference(path)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt, 10)
    assert llm.stats()["prefix_cache_hit_rate"] > 0
    assert_all_blocks_free(llm)


def test_a_request_reuses_a_cached_prefix_up_to_an_evicted_block(checkpoint, rng):
    path = checkpoint("llama")
    llm = make_llm(path, enable_prefix_caching=True)
    prompt = random_prompts(rng, [14])[0]
    llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    manager = llm.engine.block_manager
    [blocks] = manager.cached_prefix(Sequence(0, 0, prompt + [5], key=None, detokenizer=None))
    assert len(blocks) == 3
    manager.prefix_caches[0].evictable.move_to_end(blocks[1], last=False)  # the middle block goes first
    manager.make_room(manager.device_pool.num_free + 1)
    [output] = llm.generate({"prompt_token_ids": prompt + [9, 9]}, GREEDY, use_tqdm=False)
    assert output.num_cached_tokens == 4
    assert output.outputs[0].token_ids == hf_greedy(load_reference(path), prompt + [9, 9], 10)
    assert_all_blocks_free(llm)


def test_a_conversation_continues_from_cached_prompt_and_output_blocks(checkpoint, rng):
    """Blocks that a multi-step decode loop filled are cached only as far as it wrote them:
    its last token is sampled, not yet written, when max_tokens cuts the loop short."""
    path = checkpoint("llama")
    llm = make_llm(path, enable_prefix_caching=True, num_scheduler_steps=4)
    turn = random_prompts(rng, [5])[0]
    for max_tokens in (3, 6, 5):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        [output] = llm.generate({"prompt_token_ids": turn}, params, use_tqdm=False)
        assert output.outputs[0].token_ids == hf_greedy(load_reference(path), turn, max_tokens)
        turn = turn + output.outputs[0].token_ids + random_prompts(rng, [2])[0]
    assert output.num_cached_tokens > 8  # earlier turns' outputs came from the cache
    assert_all_blocks_free(llm)


def test_beam_search_with_a_prefix_cache_under_recompute_preemption(checkpoint, rng):
    path = checkpoint("gpt2")
    prompts = [p + [9, 9, 9, 9, 9, 9, 9, 9] for p in random_prompts(rng, [6, 6, 6])]  # shared tails, cached
    params = BeamSearchParams(beam_width=3, max_tokens=12)
    roomy = make_llm(path, max_num_seqs=16).beam_search([{"prompt_token_ids": p} for p in prompts], params)
    llm = make_llm(path, max_num_seqs=16, enable_prefix_caching=True, num_gpu_blocks_override=24,
                   max_num_batched_tokens=16)
    tight = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert [[s.tokens for s in o.sequences] for o in tight] == [[s.tokens for s in o.sequences] for o in roomy]
    assert llm.stats()["num_preemptions"] > 0
    assert_all_blocks_free(llm)
