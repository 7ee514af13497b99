"""Beam search inside the engine (§4.4, §5.2 of the paper): the search rule, kept apart from
the blocks.

Each step every live beam offers its most likely next tokens; the search keeps the best
`beam_width` continuations and finishes the hypotheses that end in EOS. The engine turns the
choice into block operations: a beam kept twice forks (its blocks are shared and copied on
write), a beam not kept is freed.

The rule is Hugging Face's `generate(num_beams=..., do_sample=False)` (transformers 5.x,
`_beam_search`), so results can be checked against it token for token:
- candidates: the top max(2, 1 + number of EOS ids) x beam_width of beam score + token
  logprob over all beams and tokens, best first (ties: lower beam, then lower token id;
  torch.topk leaves the order of exact ties unspecified);
- a candidate ending in EOS, or reaching max_tokens, finishes only if it ranks within the
  first beam_width; its score is cum_logprob / generated_len ** length_penalty, the length
  counting the EOS; the best beam_width finished hypotheses are kept;
- the next beams are the first beam_width candidates that do not finish;
- stopping: at max_tokens; or once beam_width hypotheses are finished and, with
  early_stopping=True, at once; with False, when the best live beam, normalised by the
  current length, cannot beat the worst kept hypothesis; with "never", the same normalised by
  max_tokens (when length_penalty > 0).
A width of 1 is a beam search with one beam (an EOS ends a hypothesis and the runner-up token
carries on), not Hugging Face's num_beams=1, which is greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from paged_jax.sampling_params import MAX_LOGPROBS, requirement

EARLY_STOPPING = (True, False, "never")


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's names and defaults, plus Hugging Face's early_stopping. Invalid values raise
    ValueError naming the field."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False

    def __post_init__(self):
        require = requirement(self)
        require(isinstance(self.beam_width, int) and self.beam_width >= 1, "beam_width", "must be an integer >= 1")
        require(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        require(self.temperature == 0, "temperature", "must be 0 (beam search is deterministic here)")
        require(self.early_stopping in EARLY_STOPPING, "early_stopping", f"must be one of {EARLY_STOPPING}")


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens (ending in EOS unless it hit max_tokens)."""

    token_ids: list[int]
    cum_logprob: float
    score: float  # cum_logprob / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" (EOS) or "length"
    text: str = ""  # filled in by the engine, which has the tokenizer


@dataclass(frozen=True)
class Continuation:
    parent: int  # index of the live beam it extends
    token: int
    cum_logprob: float


class BeamSearch:
    """The search state of one request: the finished hypotheses, best first."""

    def __init__(self, params: BeamSearchParams, eos_token_ids: tuple[int, ...]):
        self.params = params
        self.eos = () if params.ignore_eos else tuple(eos_token_ids)
        self.hypotheses: list[Hypothesis] = []
        self.done = False

    @property
    def num_candidates(self) -> int:
        """How many top tokens each beam must offer."""
        return max(2, 1 + len(self.eos)) * self.params.beam_width

    def step(self, beams: list[tuple[list[int], float, list[tuple[int, float]]]]) -> list[Continuation]:
        """beams: (generated tokens, cum_logprob, top (token, logprob) pairs, best first) of each
        live beam. Finishes hypotheses and returns the next live beams (none when done)."""
        p, width = self.params, self.params.beam_width
        generated = len(beams[0][0]) + 1  # the candidates' length
        candidates = sorted(
            ((cum + logprob, b, token) for b, (_, cum, top) in enumerate(beams) for token, logprob in top),
            key=lambda c: (-c[0], c[1], c[2]),
        )[: self.num_candidates]
        at_limit = generated >= p.max_tokens
        ends = [at_limit or token in self.eos for _, _, token in candidates]
        for rank, ((score, b, token), end) in enumerate(zip(candidates, ends)):
            if end and rank < width:
                self._finish(beams[b][0] + [token], score, "length" if token not in self.eos else "stop")
        nxt = [Continuation(b, token, score) for (score, b, token), end in zip(candidates, ends) if not end][:width]
        self.done = all(ends) or not self._worth_going_on(nxt[0].cum_logprob, generated)
        return [] if self.done else nxt

    def _finish(self, token_ids: list[int], cum_logprob: float, reason: str) -> None:
        score = cum_logprob / len(token_ids) ** self.params.length_penalty
        self.hypotheses.append(Hypothesis(token_ids, cum_logprob, score, reason))
        self.hypotheses.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
        del self.hypotheses[self.params.beam_width :]

    def _worth_going_on(self, best_cum_logprob: float, generated: int) -> bool:
        p = self.params
        if len(self.hypotheses) < p.beam_width:
            return True
        if p.early_stopping is True:
            return False
        length = p.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else generated
        return best_cum_logprob / length ** p.length_penalty > self.hypotheses[-1].score


def check_beam_width(params: BeamSearchParams, eos_token_ids: tuple[int, ...]) -> None:
    """Each beam's candidates come from the sampler's top logprobs, which hold MAX_LOGPROBS."""
    need = BeamSearch(params, eos_token_ids).num_candidates
    if need > MAX_LOGPROBS:
        raise ValueError(f"BeamSearchParams.beam_width {params.beam_width} needs the top {need} tokens of each "
                         f"beam; at most {MAX_LOGPROBS} are available (beam_width <= {MAX_LOGPROBS // 2} "
                         f"with one EOS id)")
