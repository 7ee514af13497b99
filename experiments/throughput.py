"""Offline throughput: our engine vs Hugging Face `generate` with static batches (the paper's
"up to 24x" baseline), on a ShareGPT-like synthetic workload.

Both run the same random Llama-shaped checkpoint (saved once with transformers) and the same
requests: prompts of random tokens, each with its own output length (ignore_eos, as vLLM's
throughput benchmark does), sampled at temperature 1. Hugging Face runs fixed batches padded
to their longest prompt, each until its longest output is done; every batch size tried is
reported and the best is the baseline. Output tokens/s counts only requested tokens.

CPU: a ~20M-parameter model, 48 requests scaled to a 512-token context.
GPU: a ~1B-parameter model, 1000 requests at a 2048-token context.
Run `python -m experiments.throughput [--requests N]`; results go to
experiments/results/throughput_<device>.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax

from experiments.common import device_slug, markdown_table, random_llama_checkpoint, report
from experiments.workloads import SHAREGPT, describe, prompt_token_ids, sample_requests
from paged_jax import LLM, SamplingParams

CPU = dict(model=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=16384, max_position_embeddings=512),
           requests=48, max_model_len=512, hf_batches=(8, 16, 48), max_num_seqs=64, dtype="float32")
GPU = dict(model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048),
           requests=1000, max_model_len=2048, hf_batches=(16, 64), max_num_seqs=256, dtype="bfloat16")


def run_ours(path: Path, prompts, requests, sizes, scheduler_steps: int) -> dict:
    start = time.perf_counter()
    llm = LLM(str(path), max_model_len=sizes["max_model_len"], max_num_seqs=sizes["max_num_seqs"], seed=0,
              num_scheduler_steps=scheduler_steps)
    warm_up = time.perf_counter() - start
    params = [SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    seconds = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outputs] == [r.output_len for r in requests]
    return dict(seconds=seconds, warm_up=warm_up, stats=llm.stats())


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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, help="number of requests (default: 48 on CPU, 1000 on GPU)")
    parser.add_argument("--scheduler-steps", type=int, nargs="+", default=[1, 8],
                        help="num_scheduler_steps values to run (decode steps per device loop)")
    args = parser.parse_args(argv)
    sizes = GPU if jax.default_backend() == "gpu" else CPU
    requests = sample_requests(SHAREGPT, args.requests or sizes["requests"], max_model_len=sizes["max_model_len"])
    prompts = prompt_token_ids(requests, sizes["model"]["vocab_size"])
    out_tokens = sum(r.output_len for r in requests)
    all_tokens = out_tokens + sum(r.prompt_len for r in requests)
    with tempfile.TemporaryDirectory() as tmp:
        path, num_params = random_llama_checkpoint(sizes["model"], Path(tmp), sizes["dtype"])
        ours_by_steps = {k: run_ours(path, prompts, requests, sizes, k) for k in args.scheduler_steps}
        hf = {b: run_hf(path, prompts, requests, b, sizes["dtype"]) for b in sizes["hf_batches"]}
    best_steps = min(ours_by_steps, key=lambda k: ours_by_steps[k]["seconds"])
    ours = ours_by_steps[best_steps]

    def row(name, seconds):
        return [name, f"{seconds:.1f}", f"{len(requests) / seconds:.2f}", f"{out_tokens / seconds:.0f}",
                f"{all_tokens / seconds:.0f}"]

    best = min(hf, key=hf.get)
    rows = [row(f"paged-jax, num_scheduler_steps={k}", r["seconds"]) for k, r in ours_by_steps.items()]
    rows += [row(f"HF generate, batch {b}", s) for b, s in hf.items()]
    stats = ours["stats"]
    body = (
        f"Random Llama-shaped model, {num_params / 1e6:.1f}M parameters, {sizes['dtype']}; "
        f"{describe(SHAREGPT, requests, sizes['max_model_len'])}. Sampling at temperature 1, ignore_eos.\n\n"
        + markdown_table(["system", "seconds", "requests/s", "output tokens/s", "total tokens/s"], rows)
        + f"\n\n- speed-up of paged-jax (num_scheduler_steps={best_steps}) over the best HF batch size ({best}): "
        f"**{hf[best] / ours['seconds']:.2f}x** output tokens/s"
        + f"\n- paged-jax warm-up (compiling every step shape, not counted above): {ours['warm_up']:.1f} s"
        + f"\n- host overhead (share of step time not waiting for the device): {100 * stats['host_overhead']:.1f}%"
        + f"\n- steps {stats['num_steps']}, preemptions {stats['num_preemptions']}, "
        f"KV utilisation {100 * stats['kv_utilization']:.1f}%, compiles after warm-up {stats['compiles_after_warmup']}"
    )
    report(f"throughput_{device_slug()}", "Offline throughput vs Hugging Face generate", body)
    return body


if __name__ == "__main__":
    main()
