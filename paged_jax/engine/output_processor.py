"""What becomes of a sampled token: appended to its sequence (its grammar advanced, its text
detokenised, its logprobs kept), then the stop conditions (stop tokens and strings, the
grammar's end, max_tokens, max_model_len), as vLLM's output processing does."""

from __future__ import annotations

import logging

from paged_jax.outputs import Logprob
from paged_jax.sampling_params import SamplingParams
from paged_jax.sequence import Sequence, SequenceGroup
from paged_jax.tokenizer import Tokenizer
from paged_jax.worker.executor import Sampled

logger = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len

    def append(self, seq: Sequence, group: SequenceGroup, sampled: Sampled, now: float) -> None:
        params = group.params
        token = sampled.token
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            logger.warning("request %s: its grammar refused token %d, as no token it allows could be sampled; the "
                           "sequence ends", group.request_id, token)
            seq.finish_reason = "error"
            return
        seq.output_token_ids.append(token)
        group.metrics.first_token_time = group.metrics.first_token_time or now
        group.metrics.last_token_time = now
        if params.logprobs is not None:
            seq.cumulative_logprob += sampled.logprob
            seq.logprobs.append(self.logprobs_entry(sampled))
        delta = seq.detokenizer.add([token]) if seq.detokenizer else ""
        seq.text += delta
        self._check_stop(seq, params, token, delta)

    def logprobs_entry(self, scored: Sampled) -> dict[int, Logprob]:
        """vLLM's logprobs at one position: the token's own (with its rank), then the top ones."""
        entry = {scored.token: Logprob(scored.logprob, scored.rank, self._decode(scored.token))}
        for rank, (token, logprob) in enumerate(scored.top, start=1):
            entry.setdefault(token, Logprob(logprob, rank, self._decode(token)))
        return entry

    def _decode(self, token: int) -> str | None:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else None

    def _check_stop(self, seq: Sequence, params: SamplingParams, token: int, delta: str) -> None:
        num_output = len(seq.output_token_ids)
        grammar_done = seq.matcher is not None and seq.matcher.is_terminated()  # token was its stop token
        if num_output >= params.min_tokens or grammar_done:
            stop_token = token in params.stop_token_ids
            if stop_token or grammar_done or (token in self.eos_token_ids and not params.ignore_eos):
                if not params.include_stop_str_in_output:  # a stop token's text is not emitted
                    seq.text = seq.text[: len(seq.text) - len(delta)]
                seq.finish_reason, seq.stop_reason = "stop", token if stop_token else None
                return
            for stop in params.stop_strings:
                start = max(0, len(seq.text) - len(delta) - len(stop) + 1)
                found = seq.text.find(stop, start)
                if found >= 0:
                    seq.text = seq.text[: found + (len(stop) if params.include_stop_str_in_output else 0)]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
        if num_output >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
