"""Synthetic request traces shaped like the paper's workloads (§6.1, Fig. 11).

ShareGPT and Alpaca are described by their mean prompt / output lengths (161 / 338 and
19 / 58 tokens, ShareGPT with much the higher variance). We draw lengths from log-normal
distributions whose location is calibrated so that, after vLLM's benchmark filters (prompt and
output >= 4 tokens, prompt <= 1024, prompt + output <= 2048), the realised means hit those
targets. Traces scale to a smaller model's context by shrinking every length by
max_model_len / 2048. Arrivals are Poisson at a given rate, or gamma for burstiness. vLLM's
"random" traces (fixed or uniform lengths) serve sweeps that need a controlled length.
Fig. 17's chatbot turns ShareGPT-like rounds into conversations. A request can decode n
parallel samples or run a beam search (Fig. 14). Everything is seeded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from paged_jax.beam_search import BeamSearchParams
from paged_jax.sampling_params import SamplingParams

SHAREGPT_CONTEXT = 2048


@dataclass(frozen=True)
class Dataset:
    name: str
    prompt_mean: float
    output_mean: float
    sigma: float  # log-normal shape: ShareGPT's lengths vary far more than Alpaca's


CHAT_ROUNDS_MEAN = 5.0  # rounds per conversation (geometric); the paper gives none: 5 cuts 59% of prompts
SHAREGPT = Dataset("sharegpt", 161.31, 337.99, sigma=1.0)
ALPACA = Dataset("alpaca", 19.31, 58.45, sigma=0.6)
DATASETS = {d.name: d for d in (SHAREGPT, ALPACA)}


@dataclass(frozen=True)
class Decoding:
    """How a request decodes (§6.3): n parallel samples, or a beam search of width
    beam_width (0: none)."""

    n: int = 1
    beam_width: int = 0

    def params(self, output_len: int, seed: int) -> SamplingParams | BeamSearchParams:
        """The request's parameters; outputs run to output_len, as the paper's traces do."""
        if self.beam_width:
            return BeamSearchParams(beam_width=self.beam_width, max_tokens=output_len, ignore_eos=True)
        return SamplingParams(n=self.n, temperature=1.0, max_tokens=output_len, ignore_eos=True, seed=seed)

    @property
    def name(self) -> str:
        return f"beam width {self.beam_width}" if self.beam_width else f"n = {self.n}"


@dataclass(frozen=True)
class Request:
    prompt_len: int
    output_len: int
    arrival_time: float = 0.0
    decoding: Decoding = Decoding()


def _draw(rng, mu_prompt, mu_output, sigma, n):
    prompt = np.maximum(1, np.rint(rng.lognormal(mu_prompt, sigma, n))).astype(int)
    output = np.maximum(1, np.rint(rng.lognormal(mu_output, sigma, n))).astype(int)
    keep = (prompt >= 4) & (output >= 4) & (prompt <= 1024) & (prompt + output <= SHAREGPT_CONTEXT)
    return prompt[keep], output[keep]


@functools.cache
def calibrate(dataset: Dataset) -> tuple[float, float]:
    """Log-normal locations whose filtered means equal the dataset's targets."""
    mu = np.log([dataset.prompt_mean, dataset.output_mean]) - dataset.sigma**2 / 2
    for _ in range(30):
        prompt, output = _draw(np.random.default_rng(0), mu[0], mu[1], dataset.sigma, 200_000)
        mu += np.log([dataset.prompt_mean / prompt.mean(), dataset.output_mean / output.mean()])
    return float(mu[0]), float(mu[1])


def sample_requests(dataset: Dataset, n: int, *, max_model_len: int = SHAREGPT_CONTEXT, seed: int = 0,
                    rate: float = float("inf"), burstiness: float = 1.0) -> list[Request]:
    """n requests; lengths scaled to max_model_len; arrivals at `rate` req/s (inf: all at 0)."""
    rng = np.random.default_rng(seed)
    mu_prompt, mu_output = calibrate(dataset)
    prompt, output = np.empty(0, int), np.empty(0, int)
    while len(prompt) < n:
        p, o = _draw(rng, mu_prompt, mu_output, dataset.sigma, 2 * n)
        prompt, output = np.concatenate([prompt, p]), np.concatenate([output, o])
    scale = min(1.0, max_model_len / SHAREGPT_CONTEXT)
    prompt = np.maximum(1, np.floor(prompt[:n] * scale)).astype(int)
    output = np.maximum(1, np.floor(output[:n] * scale)).astype(int)
    arrivals = arrival_times(n, rate, burstiness, rng)
    return [Request(int(p), int(o), float(t)) for p, o, t in zip(prompt, output, arrivals)]


def chatbot_requests(n: int, *, max_model_len: int = SHAREGPT_CONTEXT, seed: int = 0,
                     rate: float = float("inf")) -> list[Request]:
    """Fig. 17's chatbot trace: each request is a round of a conversation of ShareGPT-like
    rounds. Its prompt is the conversation so far (the earlier rounds' questions and answers
    and its own question) cut to its last half-context, 1024 tokens at 2048 as in the paper;
    its output is a ShareGPT-like answer cut to the same. A request is the k-th round of its
    conversation with probability (1 - p)^(k-1) p, p = 1/CHAT_ROUNDS_MEAN: most conversations
    are short, but long ones fill the prompt, so that "most requests have 1024-token prompts"
    (§6.5). The K/V of earlier rounds is not kept, as in the paper."""
    rng = np.random.default_rng(seed)
    mu_prompt, mu_output = calibrate(SHAREGPT)
    half = max_model_len // 2
    rounds = rng.geometric(1 / CHAT_ROUNDS_MEAN, n)
    prompt, output = _draw(rng, mu_prompt, mu_output, SHAREGPT.sigma, 4 * int(rounds.sum()) + 8)
    history = np.concatenate([[0], np.cumsum(prompt + output)])
    ends = np.cumsum(rounds)  # request i is the last round of rounds[i] consecutive draws
    scale = max_model_len / SHAREGPT_CONTEXT
    prompts = [min(half, int((history[e - 1] - history[e - r] + prompt[e - 1]) * scale)) for e, r in zip(ends, rounds)]
    outputs = [max(1, min(half, int(output[e - 1] * scale))) for e in ends]
    arrivals = arrival_times(n, rate, 1.0, rng)
    return [Request(max(1, p), o, float(t)) for p, o, t in zip(prompts, outputs, arrivals)]


def random_requests(n: int, input_len: int, output_len: int, *, range_ratio: float = 0.0, seed: int = 0,
                    rate: float = float("inf"), burstiness: float = 1.0) -> list[Request]:
    """vLLM's "random" benchmark trace: lengths drawn uniformly from len * [1 - range_ratio,
    1 + range_ratio] (range_ratio 0: every request the same), for sweeps where the length
    distribution should not vary."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)

    def lengths(mean: int) -> np.ndarray:
        low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(low, high + 1, n)

    prompt, output = lengths(input_len), lengths(output_len)
    arrivals = arrival_times(n, rate, burstiness, rng)
    return [Request(int(p), int(o), float(t)) for p, o, t in zip(prompt, output, arrivals)]


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Cumulative gamma inter-arrival times with mean 1/rate; burstiness 1 is Poisson, lower
    is burstier."""
    if not np.isfinite(rate):
        return np.zeros(n)
    return np.cumsum(rng.gamma(burstiness, 1.0 / (rate * burstiness), n))


def prompt_token_ids(requests: list[Request], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random prompt tokens (ids from 3 up, past the usual special tokens)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, r.prompt_len).tolist() for r in requests]


def describe(dataset: Dataset, requests: list[Request], max_model_len: int = SHAREGPT_CONTEXT) -> str:
    """Realised statistics next to the (scaled) targets."""
    scale = min(1.0, max_model_len / SHAREGPT_CONTEXT)
    prompt = np.array([r.prompt_len for r in requests])
    output = np.array([r.output_len for r in requests])
    return (f"{dataset.name}: {len(requests)} requests; prompt mean {prompt.mean():.1f} (target "
            f"{dataset.prompt_mean * scale:.1f}), std {prompt.std():.1f}; output mean {output.mean():.1f} "
            f"(target {dataset.output_mean * scale:.1f}), std {output.std():.1f}")
