"""Start-up: compiled step shapes persist across processes, only the covering shapes are
compiled before serving (the rest in the background, with steps padded to a ready shape
meanwhile and never a compile on the serving path), and start-up says what it does."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from serving import assert_all_blocks_free, make_llm, random_prompts

from paged_jax import SamplingParams
from paged_jax.worker.compilation import Executables

SMALL = dict(max_num_seqs=4, max_num_batched_tokens=32, block_size=4, num_gpu_blocks_override=64,
             attention_backend="xla", num_scheduler_steps=4)

START = """
import json, sys
from paged_jax import LLM
llm = LLM(sys.argv[1], **json.loads(sys.argv[2]))
llm.engine.wait_for_compiles()
print(json.dumps(llm.stats()))
"""


def start_in_a_new_process(path, cache_dir, **env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "PAGED_JAX_COMPILATION_CACHE"}
    environment.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), **env)
    out = subprocess.run([sys.executable, "-c", START, str(path), json.dumps(SMALL)], env=environment,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_start_loads_every_step_shape_from_the_persistent_cache(checkpoint, tmp_path):
    path = checkpoint("llama")
    cold = start_in_a_new_process(path, tmp_path / "cache")
    assert cold["executables_built"] > 5 and cold["executables_from_cache"] == 0
    assert any((tmp_path / "cache").iterdir())
    warm = start_in_a_new_process(path, tmp_path / "cache")
    assert warm["executables_from_cache"] == warm["executables_built"] == cold["executables_built"]


def test_the_persistent_cache_can_be_turned_off(checkpoint, tmp_path):
    stats = start_in_a_new_process(checkpoint("llama"), tmp_path / "cache", PAGED_JAX_COMPILATION_CACHE="0")
    assert stats["executables_from_cache"] == 0
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_step_pads_to_the_smallest_ready_bucket(checkpoint):
    runner = make_llm(checkpoint("llama"), **SMALL).engine.executor
    runner.executables = Executables()
    largest, smallest = runner.decode_buckets[-1], runner.decode_buckets[0]
    runner.executables.build(largest, lambda: "compiled")
    assert runner.bucket_for(1, 1, decode=True) == largest  # the only one ready: pad to it
    runner.executables.build(smallest, lambda: "compiled")
    assert runner.bucket_for(1, 1, decode=True) == smallest
    assert runner.bucket_for(1, 2, decode=True) == largest  # the smallest ready one that fits


def test_a_step_wants_its_own_shape_only_when_padding_would_more_than_double_it(checkpoint):
    class Recording(Executables):
        def __init__(self):
            super().__init__()
            self.wanted = []

        def want(self, key):
            self.wanted.append(key)

    runner = make_llm(checkpoint("llama"), **SMALL).engine.executor
    runner.executables = Recording()
    largest = runner.decode_buckets[-1]  # 4 sequences
    runner.executables.build(largest, lambda: "compiled")
    runner.bucket_for(2, 2, decode=True)  # padded 2x: cheaper than a compile beside it
    assert runner.executables.wanted == []
    runner.bucket_for(1, 1, decode=True)  # padded 4x: its own shape is wanted
    assert runner.executables.wanted == [runner.decode_buckets[0]]


def test_a_wanted_shape_compiles_at_once_and_the_others_wait_for_an_idle_engine():
    executables, built = Executables(), []

    def task(key):
        return key, lambda: built.append(key) or key

    executables.used()  # a step just ran
    executables.queue([task("a"), task("b")])
    executables.want("b")
    deadline = time.monotonic() + 30
    while "b" not in executables and time.monotonic() < deadline:
        executables.used()  # the engine keeps stepping
        time.sleep(0.02)
    assert built == ["b"]  # "a" was nobody's, and the engine was busy
    assert executables.wait(timeout=30) and built == ["b", "a"]  # once idle, the rest


def test_serving_during_background_compiles_gives_the_same_tokens_and_never_compiles(checkpoint, rng):
    path = checkpoint("llama")
    prompts = random_prompts(rng, [5, 23, 14, 2, 9])
    params = [SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              # top_p: a decode loop variant compiled only when first wanted (one step meanwhile)
              SamplingParams(temperature=1.0, top_p=0.8, max_tokens=9, seed=3, ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=17, seed=4, ignore_eos=True)] * 2
    inputs = [{"prompt_token_ids": p} for p in prompts]
    runs = {}
    for background in (False, True):
        llm = make_llm(path, warm_up=True, background_compile=background, **SMALL)
        outputs = llm.generate(inputs, params[: len(prompts)], use_tqdm=False)
        runs[background] = [o.outputs[0].token_ids for o in outputs]
        assert llm.stats()["compiles_after_warmup"] == 0
        assert llm.engine.wait_for_compiles(timeout=300)
        assert llm.stats()["executables_pending"] == 0
        assert_all_blocks_free(llm)
    assert runs[True] == runs[False]


def test_auto_dtype_keeps_bfloat16_on_a_cpu_that_computes_it_else_float32():
    import jax.numpy as jnp

    from paged_jax import LLM
    from paged_jax.server.serve import DEFAULT_MODEL as MODEL_DIR  # stored in bfloat16
    from paged_jax.worker.loading import cpu_has_bfloat16

    expected = jnp.bfloat16 if cpu_has_bfloat16() else jnp.float32
    assert LLM(str(MODEL_DIR), warm_up=False).engine.executor.model.dtype == expected
    assert LLM(str(MODEL_DIR), warm_up=False, dtype="float32").engine.executor.model.dtype == jnp.float32


def test_start_up_says_what_it_is_doing(checkpoint):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("paged_jax")
    logger.addHandler(handler)
    try:
        llm = make_llm(checkpoint("llama"), warm_up=True, **SMALL)
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert any("LlamaForCausalLM" in line and "max_num_seqs 4" in line for line in lines)
    assert any("KV cache: 64 blocks of 4 tokens (256 tokens" in line for line in lines)
    assert any(line.startswith("ready in") and "from the compilation cache" in line for line in lines)
    stats = llm.stats()
    assert stats["start_up_seconds"] > 0 and stats["executables_built"] >= 3


EXIT_EARLY = """
import json, sys
from paged_jax import LLM, SamplingParams
llm = LLM(sys.argv[1], compilation_cache=False, **json.loads(sys.argv[2]))
llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)
print(llm.stats()["executables_pending"], flush=True)
"""


def test_a_process_that_exits_while_shapes_compile_in_the_background_exits_cleanly(checkpoint):
    """20 processes, two at a time, each leaving with shapes still queued for the compile
    thread (the persistent cache off, so they really compile): every one exits with 0 and
    says nothing on stderr of a crash."""
    command = [sys.executable, "-c", EXIT_EARLY, str(checkpoint("llama")), json.dumps(SMALL)]
    results = []
    for _ in range(10):
        pair = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results += [(p.returncode, out, err) for p in pair for out, err in [p.communicate(timeout=300)]]
    crashes = [err[-2000:] for code, _, err in results
               if code != 0 or any(s in err for s in ("Fatal Python error", "Traceback", "KeyError"))]
    assert crashes == []
    assert sum(int(out.split()[-1]) > 0 for _, out, _ in results) >= 15, "most processes left shapes compiling"
