"""The serving benchmark's arithmetic: vLLM's definitions of TTFT, TPOT, ITL and throughput,
on requests whose timings are known."""

from __future__ import annotations

import pytest

from experiments.serving_bench import Result, request_body, summarize


def test_metrics_follow_vllm_definitions():
    results = [
        Result(prompt_tokens=10, max_tokens=5, ok=True, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        Result(prompt_tokens=20, max_tokens=3, ok=True, output_tokens=3, ttft=0.3, latency=0.7, itl=[0.2, 0.2]),
        Result(prompt_tokens=5, max_tokens=4, ok=False, error="HTTP 400"),
    ]
    row = summarize(results, rate=2.0, duration=2.0)
    assert row["completed"] == 2 and row["errors"] == ["HTTP 400"]
    assert row["request_throughput"] == pytest.approx(1.0)
    assert row["output_throughput"] == pytest.approx(4.0)  # 8 tokens in 2 s
    assert row["ttft_ms"]["mean"] == pytest.approx(200) and row["ttft_ms"]["median"] == pytest.approx(200)
    assert row["tpot_ms"]["mean"] == pytest.approx((100 + 200) / 2)  # (latency - ttft) / (tokens - 1)
    assert row["itl_ms"]["mean"] == pytest.approx(800 / 6)
    assert row["e2el_ms"]["median"] == pytest.approx(600)
    assert row["short_outputs"] == 0


def test_both_servers_are_asked_for_every_output_token():
    ours = request_body("paged-jax", "m", "x", 7)
    theirs = request_body("transformers", "m", "x", 7)
    assert ours["ignore_eos"] is True and "-1" in theirs["generation_config"]
    assert ours["max_tokens"] == theirs["max_tokens"] == 7 and ours["stream"] and theirs["stream"]
