"""Offline throughput: our engine against Hugging Face `generate` with static batches (the
paper's "up to 24x" baseline) and Hugging Face's own continuous batching over a paged cache
(`generate_batch`, transformers 5), on a ShareGPT-like synthetic workload; with the matmul
roofline and a breakdown of where our run's time goes (experiments/step_profile.py).

All run the same random Llama-shaped checkpoint (saved once with transformers) and the same
requests: prompts of random tokens, each with its own output length (ignore_eos, as vLLM's
throughput benchmark does), sampled at temperature 1. Hugging Face's static batches are padded
to their longest prompt and run until their longest output is done; every batch size tried is
reported and the best is the baseline. Output tokens/s counts only requested tokens. Ours runs
several times after its warm-up (the machine is shared and noisy): the median is compared,
the spread shown.

Two roofline fractions: ours against the model's matmuls alone at batch 48 (the fastest
decode batch this workload has; its later steps run smaller batches, so this bound is out of
reach), and against the matmuls of exactly the steps our run took at their real token counts
(the schedule's roofline: attention, sampling, padding and host work free).

CPU: a ~20M-parameter model, 48 requests scaled to a 512-token context.
GPU: a ~1B-parameter model, 1000 requests at a 2048-token context.
Run `python -m experiments.throughput [--requests N]`; results go to
experiments/results/throughput_<device>.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax

from experiments import step_profile
from experiments.common import device_slug, markdown_table, random_llama_checkpoint, report
from experiments.workloads import SHAREGPT, describe, prompt_token_ids, sample_requests
from paged_jax import LLM, SamplingParams

CPU = dict(model=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=16384, max_position_embeddings=512),
           requests=48, max_model_len=512, hf_batches=(16, 48), max_num_seqs=64, dtype="float32", roofline_batch=48)
GPU = dict(model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048),
           requests=1000, max_model_len=2048, hf_batches=(16, 64), max_num_seqs=256, dtype="bfloat16",
           roofline_batch=256)


def run_ours(path: Path, prompts, requests, sizes, scheduler_steps: int, runs: int) -> dict:
    start = time.perf_counter()
    llm = LLM(str(path), max_model_len=sizes["max_model_len"], max_num_seqs=sizes["max_num_seqs"], seed=0,
              num_scheduler_steps=scheduler_steps, background_compile=False)
    warm_up = time.perf_counter() - start
    params = [SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    seconds = []
    for run in range(runs):
        with step_profile.recording(llm.engine.runner) as calls:
            start = time.perf_counter()
            outputs = llm.generate(inputs, params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
        assert [len(o.outputs[0].token_ids) for o in outputs] == [r.output_len for r in requests]
    profile = step_profile.profile(llm.engine.model, llm.engine.runner, calls, seconds[-1],
                                   llm.stats()["host_overhead"])
    roofline = step_profile.matmul_rate(llm.engine.model, sizes["roofline_batch"])
    return dict(seconds=seconds, warm_up=warm_up, stats=llm.stats(), profile=profile, roofline=roofline)


def run_hf(path: Path, prompts, requests, batch_size: int, dtype: str) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, wanted = prompts[i : i + batch_size], requests[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        longest = max(r.output_len for r in wanted)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=longest, min_new_tokens=longest, pad_token_id=0, eos_token_id=None)
    return time.perf_counter() - start


def run_hf_continuous(path: Path, prompts, requests, dtype: str) -> float:
    """Hugging Face's continuous batching (paged KV cache, its own scheduler): every request
    is queued with its own max_new_tokens, as ours are, and all results are awaited."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                              attn_implementation="paged|sdpa")
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    config = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
                                           pad_token_id=0, max_new_tokens=max(r.output_len for r in requests))
    start = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=5) as manager:
        for i, (prompt, request) in enumerate(zip(prompts, requests)):
            manager.add_request(prompt, request_id=str(i), max_new_tokens=request.output_len)
        lengths = {}
        deadline = time.monotonic() + 3600
        while len(lengths) < len(prompts) and time.monotonic() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                lengths[int(result.request_id)] = len(result.generated_tokens)
    seconds = time.perf_counter() - start
    assert lengths == {i: r.output_len for i, r in enumerate(requests)}, "HF continuous batching dropped tokens"
    return seconds


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, help="number of requests (default: 48 on CPU, 1000 on GPU)")
    parser.add_argument("--scheduler-steps", type=int, default=8, help="num_scheduler_steps (decode steps per loop)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of ours (the median is compared)")
    args = parser.parse_args(argv)
    sizes = GPU if jax.default_backend() == "gpu" else CPU
    requests = sample_requests(SHAREGPT, args.requests or sizes["requests"], max_model_len=sizes["max_model_len"])
    prompts = prompt_token_ids(requests, sizes["model"]["vocab_size"])
    out_tokens = sum(r.output_len for r in requests)
    all_tokens = out_tokens + sum(r.prompt_len for r in requests)
    with tempfile.TemporaryDirectory() as tmp:
        path, num_params = random_llama_checkpoint(sizes["model"], Path(tmp), sizes["dtype"])
        ours = run_ours(path, prompts, requests, sizes, args.scheduler_steps, args.runs)
        hf = {b: run_hf(path, prompts, requests, b, sizes["dtype"]) for b in sizes["hf_batches"]}
        hf_continuous = run_hf_continuous(path, prompts, requests, sizes["dtype"])
    ours_seconds = statistics.median(ours["seconds"])

    def row(name, seconds, spread=""):
        return [name, f"{seconds:.2f}{spread}", f"{len(requests) / seconds:.2f}", f"{out_tokens / seconds:.0f}",
                f"{all_tokens / seconds:.0f}"]

    best = min(hf, key=hf.get)
    spread = f" ({min(ours['seconds']):.2f}-{max(ours['seconds']):.2f})"
    rows = [row(f"paged-jax, median of {args.runs}", ours_seconds, spread)]
    rows += [row(f"HF generate, static batch {b}", s) for b, s in hf.items()]
    rows += [row("HF generate_batch (continuous batching)", hf_continuous)]
    stats, p = ours["stats"], ours["profile"]
    ours_rate = out_tokens / ours_seconds
    schedule_fraction = p["roofline"] / p["wall"]
    body = (
        f"Random Llama-shaped model, {num_params / 1e6:.1f}M parameters, {sizes['dtype']}; "
        f"{describe(SHAREGPT, requests, sizes['max_model_len'])}. Sampling at temperature 1, ignore_eos; "
        f"paged-jax with num_scheduler_steps={args.scheduler_steps}.\n\n"
        + markdown_table(["system", "seconds", "requests/s", "output tokens/s", "total tokens/s"], rows)
        + f"\n\n- paged-jax over HF static batching (best batch, {best}): **{hf[best] / ours_seconds:.2f}x** "
        f"output tokens/s (target >= 5x)"
        + f"\n- paged-jax over HF continuous batching: **{hf_continuous / ours_seconds:.2f}x** (target >= 10x)"
        + f"\n- roofline, the model's matmuls alone at batch {sizes['roofline_batch']}: {ours['roofline']:.0f} "
        f"tokens/s; paged-jax's output tokens/s are **{100 * ours_rate / ours['roofline']:.0f}%** of it"
        + f"\n- roofline of this run's schedule (the matmuls of the steps it took, at their real token counts): "
        f"{1e3 * p['roofline']:.0f} ms of its {1e3 * p['wall']:.0f} ms: **{100 * schedule_fraction:.0f}%** "
        f"(target >= 50%)"
        + f"\n- paged-jax warm-up (every step shape compiled before the runs, not counted above): "
        f"{ours['warm_up']:.1f} s"
        + f"\n- {p['device_calls']} device calls, {p['device_steps']} model steps, {p['real_tokens']} tokens "
        f"computed in {p['bucket_tokens']} bucket slots; preemptions {stats['num_preemptions']}, "
        f"compiles after warm-up {stats['compiles_after_warmup']}"
        + "\n\nWhere the last run's time goes (its device calls replayed piece by piece, "
        "experiments/step_profile.py):\n\n"
        + markdown_table(["component", "ms", "share of wall"], step_profile.breakdown_rows(p))
    )
    report(f"throughput_{device_slug()}", "Offline throughput vs Hugging Face", body)
    return body


if __name__ == "__main__":
    main()
