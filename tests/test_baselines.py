"""The paper's baselines inside our engine: Orca's contiguous reservations from a buddy
allocator, and static batching. They change where the KV cache lives and when requests are
admitted, never what comes out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving import GREEDY, assert_all_blocks_free, generate_ids, make_llm, random_prompts

from paged_jax import BeamSearchParams, SamplingParams
from paged_jax.kv.reservation import BuddyAllocator

# -- the buddy allocator -----------------------------------------------------------------------


def check_buddy(buddy: BuddyAllocator, num_blocks: int) -> None:
    """Chunks are powers of two, aligned inside their arena, disjoint, and with the free ones
    they tile the pool."""
    chunks = list(buddy.size_of.items()) + [(s, n) for n, starts in buddy.free_chunks.items() for s in starts]
    covered = sorted(b for start, size in chunks for b in range(start, start + size))
    assert covered == list(range(num_blocks))
    for start, size in chunks:
        arena_start, _ = buddy._arena(start)
        assert size & (size - 1) == 0 and (start - arena_start) % size == 0
    assert buddy.num_free == sum(n * len(starts) for n, starts in buddy.free_chunks.items())


@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(1, 100),
       ops=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=40))
def test_buddy_allocator_splits_and_merges(num_blocks, ops):
    buddy, held = BuddyAllocator(num_blocks), []
    for allocate, n in ops:
        if allocate or not held:
            start = buddy.allocate(n)
            if start is None:  # no free chunk of next_pow2(n) blocks
                assert all(size < n or not starts for size, starts in buddy.free_chunks.items())
            else:
                assert buddy.size_of[start] >= n
                held.append(start)
        else:
            buddy.free(held.pop(n % len(held)))
        check_buddy(buddy, num_blocks)
    for start in held:
        buddy.free(start)
    assert buddy.num_free == num_blocks
    arenas = {1 << bit for bit in range(num_blocks.bit_length()) if num_blocks >> bit & 1}
    assert {size for size, starts in buddy.free_chunks.items() if starts} == arenas  # every buddy merged back


# -- serving -----------------------------------------------------------------------------------

BASELINES = [dict(memory_manager="orca-max"), dict(memory_manager="orca-pow2"),
             dict(memory_manager="orca-oracle"), dict(memory_manager="orca-max", batching="static")]


def test_baselines_generate_what_the_paged_engine_does(checkpoint, rng):
    path = checkpoint("llama")
    prompts = random_prompts(rng, [5, 17, 9, 30, 12, 3])
    params = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True) for n in rng.integers(1, 20, 6)]
    paged = generate_ids(make_llm(path, max_model_len=64), prompts, params)
    for system in BASELINES:
        llm = make_llm(path, max_model_len=64, num_gpu_blocks_override=40, **system)  # room for 2 x 64 tokens
        assert generate_ids(llm, prompts, params) == paged, system
        assert_all_blocks_free(llm)


def serve_and_watch(llm, prompts, params) -> list[set[str]]:
    """Step the engine; the request ids running after each step."""
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, p)
    running = []
    while engine.has_unfinished_requests():
        engine.step()
        running.append({g.request_id for g in engine.scheduler.running})
    return running


def test_orca_admits_only_what_its_reservations_fit(checkpoint, rng):
    """orca-max reserves max_model_len for every request: a 64-block cache of 4-token blocks
    and a 64-token context hold 4 requests, however short they are."""
    llm = make_llm(checkpoint("llama"), max_model_len=64, num_gpu_blocks_override=64, max_num_seqs=8,
                   memory_manager="orca-max")
    running = serve_and_watch(llm, random_prompts(rng, [4] * 8), [GREEDY] * 8)
    assert max(map(len, running)) == 4
    paged = make_llm(checkpoint("llama"), max_model_len=64, num_gpu_blocks_override=64, max_num_seqs=8)
    assert max(map(len, serve_and_watch(paged, random_prompts(rng, [4] * 8), [GREEDY] * 8))) == 8


def test_static_batching_admits_a_batch_only_when_the_last_is_done(checkpoint, rng):
    llm = make_llm(checkpoint("llama"), max_model_len=64, max_num_seqs=3, memory_manager="orca-max",
                   batching="static")
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 9, 4, 6, 3, 8, 5)]
    running = serve_and_watch(llm, random_prompts(rng, [6] * 7), params)
    for before, after in zip(running, running[1:]):
        assert after <= before or not before  # nobody joins a running batch
    assert max(map(len, running)) == 3


def test_orca_memory_usage_counts_reservations(checkpoint, rng):
    """pow2 reserves the prompt and the next power of two of max_tokens: 5 + 8 for 5 + 6
    tokens, so 2 slots are never used; the buddy rounds 4 blocks of 4 to 16 slots, so 3 more
    are lost to external fragmentation."""
    llm = make_llm(checkpoint("llama"), max_model_len=64, memory_manager="orca-pow2")
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": random_prompts(rng, [5])[0]},
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.step()  # the prompt and the first token
    usage = engine.block_manager.memory_usage(engine.scheduler.running)
    assert (usage.token_states, usage.reserved, usage.internal, usage.external) == (5, 6, 2, 3)
    assert usage.free == 128 * 4 - 16


def test_orca_serves_several_sequences_per_request_by_copying(checkpoint, rng):
    """A request of n sequences reserves n chunks; a sibling or a forked beam gets a spare
    chunk and a copy of its parent's K/V, so outputs equal the paged engine's, sharing nothing."""
    path = checkpoint("llama")
    prompts = [{"prompt_token_ids": p} for p in random_prompts(rng, [7, 12])]
    sampling = SamplingParams(n=3, temperature=1.0, max_tokens=6, ignore_eos=True, seed=5)
    beam = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    paged = make_llm(path, max_model_len=64)
    expected = ([o.token_ids for o in paged.generate(prompts[:1], sampling, use_tqdm=False)[0].outputs],
                [s.tokens for s in paged.beam_search(prompts[1:], beam)[0].sequences])
    for system in BASELINES[:3]:
        llm = make_llm(path, max_model_len=64, **system)
        got = ([o.token_ids for o in llm.generate(prompts[:1], sampling, use_tqdm=False)[0].outputs],
               [s.tokens for s in llm.beam_search(prompts[1:], beam)[0].sequences])
        assert got == expected, system
        assert llm.engine.executor.counters.num_copied > 0, "forks copy instead of sharing"
        assert_all_blocks_free(llm)


def test_a_request_orca_cannot_serve_fails_alone(checkpoint, rng):
    """orca-max reserves 64 tokens (16 blocks) per sequence: n = 9 needs more than 128 blocks."""
    llm = make_llm(checkpoint("llama"), max_model_len=64, max_num_seqs=16, memory_manager="orca-max")
    prompts = random_prompts(rng, [6, 6])
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           [SamplingParams(n=9, max_tokens=4), GREEDY], use_tqdm=False)
    assert "more than the whole cache holds" in outputs[0].error and not outputs[0].outputs
    assert outputs[1].error is None and len(outputs[1].outputs[0].token_ids) == GREEDY.max_tokens
    assert_all_blocks_free(llm)


def test_baseline_settings_are_checked(checkpoint):
    with pytest.raises(ValueError, match="memory_manager"):
        make_llm(checkpoint("llama"), memory_manager="orca")
    with pytest.raises(ValueError, match="no prefix caching"):
        make_llm(checkpoint("llama"), memory_manager="orca-max", enable_prefix_caching=True)
    with pytest.raises(ValueError, match="batching"):
        make_llm(checkpoint("llama"), batching="dynamic")
