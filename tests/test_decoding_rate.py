"""Fig. 14 and 17's machinery: the chatbot trace has the paper's shape, and the simulator
serves requests of several sequences with the engine's forks and beam search, so that block
sharing saves what the paper measured and lets more requests run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments.serving import serve
from experiments.simulator import A100_OPT13B, Scale, simulated_server
from experiments.workloads import ALPACA, Decoding, chatbot_requests, sample_requests


def test_chatbot_prompts_are_the_last_half_context_of_a_conversation():
    requests = chatbot_requests(2000, seed=2)
    prompt = np.array([r.prompt_len for r in requests])
    output = np.array([r.output_len for r in requests])
    assert prompt.max() == 1024 and output.max() <= 1024
    assert np.mean(prompt == 1024) > 0.5  # "most requests have 1024-token prompts" (§6.5)
    assert output.mean() == pytest.approx(338, rel=0.1)  # a ShareGPT answer
    small = chatbot_requests(500, max_model_len=256, seed=2)
    assert max(r.prompt_len for r in small) == 128 and max(r.output_len for r in small) <= 128


def simulated(system: str, decoding: Decoding, rate: float, num_requests: int = 60):
    requests = [dataclasses.replace(r, decoding=decoding)
                for r in sample_requests(ALPACA, num_requests, seed=1, rate=rate)]
    server = simulated_server(system, requests, Scale(), A100_OPT13B)
    return serve(server, requests), server.sharing_saving()  # serve checks that no block leaked


@pytest.mark.parametrize(("decoding", "paper"), [(Decoding(n=2), 6.09), (Decoding(beam_width=2), 37.6)],
                         ids=["parallel", "beam"])
def test_simulated_sharing_saves_about_what_the_paper_measured(decoding, paper):
    _, saving = simulated("paged-jax", decoding, rate=4.0)
    assert 100 * saving == pytest.approx(paper, abs=6)


def test_sharing_serves_more_beams_than_copying_when_requests_queue():
    """With every request queued at once, shared beams leave room for more requests than
    beams that copy their blocks (sharing off: copied on first write, so memory runs out and
    requests are preempted; Orca: a chunk per beam), and the engine finishes more per second."""
    shared, _ = simulated("paged-jax", Decoding(beam_width=6), rate=float("inf"), num_requests=150)
    unshared, saving = simulated("paged-jax-unshared", Decoding(beam_width=6), rate=float("inf"), num_requests=150)
    orca, _ = simulated("orca-oracle", Decoding(beam_width=6), rate=float("inf"), num_requests=150)
    assert saving == 0.0 and shared.num_preemptions == 0 < unshared.num_preemptions
    assert shared.mean_batch_size > 1.3 * orca.mean_batch_size
    for copied in (unshared, orca):
        assert shared.steady_throughput > 1.1 * copied.steady_throughput
