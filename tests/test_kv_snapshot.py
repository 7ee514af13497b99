"""kv_snapshot(): the paged KV cache as the paper draws it (Fig. 6-8), read between steps. Block
tables fill slot by slot, parallel samples share their prompt's blocks until one writes into a
shared block, a request preempted by swap keeps its blocks in host memory and one preempted
by recompute keeps none, and a finished run leaves every block free."""

from __future__ import annotations

import pytest
from serving import make_llm, random_prompts

from paged_jax import SamplingParams
from paged_jax.core.kv_snapshot import BlockOwner


def watched(checkpoint, **options):
    """The tiny llama on 4-slot blocks, one token per step (no multi-step decode loop), so
    every step shows."""
    return make_llm(checkpoint("llama"), num_scheduler_steps=1, **options)


def finish(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def test_a_prompt_shorter_than_a_block_fills_k_slots_of_one_block(checkpoint, rng):
    llm = watched(checkpoint)
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": random_prompts(rng, [3])[0]},
                       SamplingParams(max_tokens=3, ignore_eos=True))
    waiting = llm.kv_snapshot().sequence("a")
    assert (waiting.status, waiting.block_table) == ("waiting", ())
    engine.step()
    snapshot = llm.kv_snapshot()
    assert snapshot == llm.kv_snapshot(), "taking a snapshot changes nothing"
    seq = snapshot.sequence("a")
    assert seq.status == "running"
    (block,) = seq.block_table
    assert seq.filled == (3,) and seq.last_block_filled == 3
    assert snapshot.refs[block] == 1
    assert snapshot.owners[block] == (BlockOwner("a", seq.seq_id, 0, 0),)
    assert len(snapshot.free) == snapshot.num_blocks - 1
    finish(engine)
    snapshot = llm.kv_snapshot()
    assert snapshot.sequences == () and snapshot.free == tuple(range(snapshot.num_blocks))


def test_parallel_samples_share_the_prompt_until_copy_on_write(checkpoint, rng):
    llm = watched(checkpoint)
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": random_prompts(rng, [6])[0]},
                       SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=4, ignore_eos=True))
    engine.step()  # the prompt: one full block and 2 slots of a second, then the sibling forks
    snapshot = llm.kv_snapshot()
    first, second = snapshot.sequence("a", 0), snapshot.sequence("a", 1)
    assert first.block_table == second.block_table and first.filled == (4, 2)
    assert [snapshot.refs[b] for b in first.block_table] == [2, 2]
    assert snapshot.shared == tuple(sorted(first.block_table))
    assert {o.seq_id for o in snapshot.owners[first.block_table[1]]} == {first.seq_id, second.seq_id}
    shared_tail = first.block_table[1]
    engine.step()  # both write their token into the shared, partly filled block
    snapshot = llm.kv_snapshot()
    first, second = snapshot.sequence("a", 0), snapshot.sequence("a", 1)
    assert first.block_table[0] == second.block_table[0] and snapshot.refs[first.block_table[0]] == 2
    tails = {first.block_table[1], second.block_table[1]}
    assert len(tails) == 2 and shared_tail in tails, "one writer got a private copy, the other kept the block"
    assert [snapshot.refs[b] for b in tails] == [1, 1]
    assert first.filled == second.filled == (4, 3)
    finish(engine)
    assert llm.kv_snapshot().free == tuple(range(snapshot.num_blocks))


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_a_preempted_request_holds_host_blocks_only_when_swapped(checkpoint, rng, mode):
    # 8 blocks of 4 slots; two requests of 8 + 12 tokens need 5 blocks each at their longest.
    llm = watched(checkpoint, num_gpu_blocks_override=8, preemption_mode=mode, swap_space=0.001)
    engine = llm.engine
    for request_id, prompt in zip("ab", random_prompts(rng, [8, 8])):
        engine.add_request(request_id, {"prompt_token_ids": prompt}, SamplingParams(max_tokens=12, ignore_eos=True))
    while not engine.scheduler.num_preemptions:
        engine.step()
    snapshot = llm.kv_snapshot()
    victim = snapshot.sequence("b")  # the latest arrival is preempted
    assert not any(o.request_id == "b" for owners in snapshot.owners for o in owners)
    if mode == "swap":
        assert victim.status == "swapped" and victim.block_table
        assert all(snapshot.host_refs[b] == 1 for b in victim.block_table)
        assert [snapshot.host_owners[b][0].logical for b in victim.block_table] == list(range(len(victim.block_table)))
        assert sum(victim.filled) == victim.num_tokens - 1, "every computed token is kept on the host"
    else:
        assert (victim.status, victim.block_table, victim.filled) == ("waiting", (), ())
        assert snapshot.host_refs == {}
    finish(engine)
    snapshot = llm.kv_snapshot()
    assert snapshot.free == tuple(range(snapshot.num_blocks))
    assert snapshot.host_refs == {}


def test_a_finished_prompts_full_blocks_stay_in_the_prefix_cache_idle(checkpoint, rng):
    llm = watched(checkpoint, enable_prefix_caching=True)
    llm.generate([{"prompt_token_ids": random_prompts(rng, [9])[0]}], SamplingParams(max_tokens=2, ignore_eos=True),
                 use_tqdm=False)
    snapshot = llm.kv_snapshot()
    # 9 + 2 tokens: the last's K/V is never computed, so 10 are cached in 2 full blocks and a third
    assert len(snapshot.cached) == 2 and set(snapshot.idle_cached) == snapshot.cached
    assert all(snapshot.refs[b] == 1 and not snapshot.owners[b] for b in snapshot.cached)
    assert len(snapshot.free) == snapshot.num_blocks - 2


def test_the_orca_baselines_have_no_paged_snapshot(checkpoint):
    llm = watched(checkpoint, memory_manager="orca-max")
    with pytest.raises(ValueError, match="paged memory manager"):
        llm.kv_snapshot()
