"""Offline throughput: our engine against vLLM itself (its CPU build, in its own virtual
environment, see vllm_offline.py; a fresh process per run, timed at its steady state, its
third `generate`), Hugging Face `generate` with static batches (the paper's "up to 24x"
baseline) and Hugging Face's own continuous batching over a paged cache (`generate_batch`,
transformers 5), on a ShareGPT-like synthetic workload; with the matmul
roofline and a breakdown of where our run's time goes (experiments/step_profile.py).

All run the same random Llama-shaped checkpoint (saved once with transformers) and the same
requests: prompts of random tokens, each with its own output length (ignore_eos, as vLLM's
throughput benchmark does), sampled at temperature 1. Hugging Face's static batches are padded
to their longest prompt and run until their longest output is done; every batch size tried is
reported and the best is the baseline. Output tokens/s counts only requested tokens. The
machine is shared and noisy: every peer's run is timed between two of ours and compared with
them, over several rounds; medians are compared, spreads shown.

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
import functools
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


def vllm_peer(python: str, path: Path, prompts, requests, sizes):
    """A run of vLLM on the workload: seconds of its steady-state generate, in a fresh process."""
    import os

    from experiments import vllm_offline

    work = dict(model=str(path), max_model_len=sizes["max_model_len"], prompts=prompts,
                lengths=[r.output_len for r in requests])

    def run() -> float:
        seconds, _ = vllm_offline.run(python, vllm_offline.VLLM, work, dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4"))
        return seconds[-1]

    return run


class Ours:
    """Our engine on the workload: every step shape compiled first, then one timed run per call
    (the last run's device calls recorded for the profile)."""

    def __init__(self, path: Path, prompts, requests, sizes, scheduler_steps: int):
        start = time.perf_counter()
        self.llm = LLM(str(path), max_model_len=sizes["max_model_len"], max_num_seqs=sizes["max_num_seqs"], seed=0,
                       num_scheduler_steps=scheduler_steps, background_compile=False)
        self.warm_up = time.perf_counter() - start
        self.params = [SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
        self.inputs = [{"prompt_token_ids": p} for p in prompts]
        self.lengths = [r.output_len for r in requests]
        self.calls, self.seconds = [], []

    def __call__(self) -> float:
        with step_profile.recording(self.llm.engine.executor) as self.calls:
            start = time.perf_counter()
            outputs = self.llm.generate(self.inputs, self.params, use_tqdm=False)
            self.seconds.append(time.perf_counter() - start)
        assert [len(o.outputs[0].token_ids) for o in outputs] == self.lengths
        return self.seconds[-1]

    def profile(self) -> dict:
        engine = self.llm.engine
        return step_profile.profile(engine.executor.model, engine.executor, self.calls, self.seconds[-1],
                                    self.llm.stats()["host_overhead"])


def hf_model(path: Path, dtype: str, **kwargs):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def hf_static(model, prompts, requests, batch_size: int) -> float:
    """Hugging Face `generate` over fixed batches, each padded to its longest prompt and run to
    its longest output. Seconds."""
    import torch

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


def hf_continuous(model, prompts, requests) -> float:
    """Hugging Face's continuous batching (`generate_batch`'s manager: a paged KV cache and its
    own scheduler): every request queued with its own max_new_tokens, as ours are, and all
    results awaited. Seconds."""
    import transformers

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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every system, interleaved with ours")
    parser.add_argument("--vllm-python", default=str(Path(__file__).parent.parent / ".venv-vllm" / "bin" / "python"),
                        help="vLLM's virtual environment (skipped when absent)")
    args = parser.parse_args(argv)
    sizes = GPU if jax.default_backend() == "gpu" else CPU
    requests = sample_requests(SHAREGPT, args.requests or sizes["requests"], max_model_len=sizes["max_model_len"])
    prompts = prompt_token_ids(requests, sizes["model"]["vocab_size"])
    out_tokens = sum(r.output_len for r in requests)
    all_tokens = out_tokens + sum(r.prompt_len for r in requests)
    timeline: list[tuple[str, float]] = []  # every timed run, in order: each peer's between two of ours

    def timed(name: str, run) -> float:
        timeline.append((name, run()))
        return timeline[-1][1]

    with tempfile.TemporaryDirectory() as tmp:
        path, num_params = random_llama_checkpoint(sizes["model"], Path(tmp), sizes["dtype"])
        ours = Ours(path, prompts, requests, sizes, args.scheduler_steps)
        static_model = hf_model(path, sizes["dtype"])
        continuous_model = hf_model(path, sizes["dtype"], attn_implementation="paged|sdpa")
        static = {b: functools.partial(hf_static, static_model, prompts, requests, b) for b in sizes["hf_batches"]}
        continuous = functools.partial(hf_continuous, continuous_model, prompts, requests)
        vllm = vllm_peer(args.vllm_python, path, prompts, requests, sizes) if Path(args.vllm_python).exists() else None
        timed("ours", ours)
        for batch, run in static.items():
            timed(f"static {batch}", run)
            timed("ours", ours)
        best = min(static, key=lambda b: next(s for n, s in timeline if n == f"static {b}"))
        for _ in range(args.rounds):
            if _:
                timed(f"static {best}", static[best])
                timed("ours", ours)
            timed("continuous", continuous)
            timed("ours", ours)
            if vllm is not None:
                timed("vllm", vllm)
                timed("ours", ours)
        profile = ours.profile()
        roofline = step_profile.matmul_rate(ours.llm.engine.executor.model, sizes["roofline_batch"])

    def seconds_of(name: str) -> list[float]:
        return [s for n, s in timeline if n == name]

    def paired(name: str) -> list[float]:
        """Each run of a peer over the mean of our runs just before and after it."""
        return [s / ((timeline[i - 1][1] + timeline[i + 1][1]) / 2) for i, (n, s) in enumerate(timeline) if n == name]

    names = {"ours": "paged-jax", **({"vllm": "vLLM 0.32.0 (CPU build)"} if vllm is not None else {}),
             **{f"static {b}": f"HF generate, static batch {b}" for b in static},
             "continuous": "HF generate_batch (continuous batching)"}
    rows = []
    for name, label in names.items():
        runs = seconds_of(name)
        median = statistics.median(runs)
        rows.append([label, len(runs), f"{median:.2f} ({min(runs):.2f}-{max(runs):.2f})",
                     f"{out_tokens / median:.0f}", f"{all_tokens / median:.0f}"])
    over_static, over_continuous = paired(f"static {best}"), paired("continuous")
    ours_rate = out_tokens / statistics.median(seconds_of("ours"))
    stats, p = ours.llm.stats(), profile

    def ratio(values: list[float]) -> str:
        return f"**{statistics.median(values):.2f}x** (runs {min(values):.2f}-{max(values):.2f}x)"

    body = (
        f"Random Llama-shaped model, {num_params / 1e6:.1f}M parameters, {sizes['dtype']}; "
        f"{describe(SHAREGPT, requests, sizes['max_model_len'])}. Sampling at temperature 1, ignore_eos; "
        f"paged-jax with num_scheduler_steps={args.scheduler_steps}. Every peer's run sits between two of ours "
        "(order: ours, each static batch, then rounds of the best static batch and continuous batching), "
        "and each speed-up is its time over the mean of those two: the machine is shared and its load "
        "drifts.\n\n"
        + markdown_table(["system", "runs", "seconds, median (range)", "output tokens/s", "total tokens/s"], rows)
        + f"\n\n- paged-jax over HF static batching (best batch, {best}): {ratio(over_static)} output tokens/s "
        f"(target >= 5x)"
        + f"\n- paged-jax over HF continuous batching: {ratio(over_continuous)} (target >= 10x)"
        + (f"\n- paged-jax over vLLM: {ratio(paired('vllm'))} output tokens/s (target >= 1.2x)" if vllm is not None
           else "\n- vLLM not measured: no virtual environment at --vllm-python (see vllm_offline.py)")
        + f"\n- roofline, the model's matmuls alone at batch {sizes['roofline_batch']}: {roofline:.0f} tokens/s; "
        f"paged-jax's output tokens/s are **{100 * ours_rate / roofline:.0f}%** of it (out of reach on this "
        f"workload: after its first steps the batch shrinks as requests finish)"
        + f"\n- roofline of the last run's schedule (the matmuls of the steps it took, at their real token "
        f"counts): {1e3 * p['roofline']:.0f} ms of its {1e3 * p['wall']:.0f} ms: "
        f"**{100 * p['roofline'] / p['wall']:.0f}%** "
        f"(target >= 50%)"
        + f"\n- paged-jax warm-up (every step shape compiled before the runs, not counted above): "
        f"{ours.warm_up:.1f} s"
        + f"\n- {p['device_calls']} device calls (model steps), {p['real_tokens']} tokens "
        f"computed in {p['bucket_tokens']} bucket slots; preemptions {stats['num_preemptions']}, "
        f"compiles after warm-up {stats['compiles_after_warmup']}"
        + "\n\nWhere the last run's time goes (its device calls replayed piece by piece, "
        "experiments/step_profile.py; a negative row is a piece that costs less inside the compiled step "
        "than alone):\n\n"
        + markdown_table(["component", "ms", "share of wall"], step_profile.breakdown_rows(p))
    )
    report(f"throughput_{device_slug()}", "Offline throughput vs Hugging Face", body)
    return body


if __name__ == "__main__":
    main()
