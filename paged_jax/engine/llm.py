"""LLM: vLLM's offline API over the engine."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Sequence as Seq

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from paged_jax.beam_search import BeamSearchParams
from paged_jax.core.kv_snapshot import KVSnapshot
from paged_jax.engine.client import PromptType
from paged_jax.engine.data_parallel import make_engine
from paged_jax.engine_args import EngineArgs
from paged_jax.outputs import BeamSearchOutput, BeamSearchSequence, RequestMetrics, RequestOutput
from paged_jax.sampling_params import SamplingParams


class LLM:
    """`LLM("path/to/hf-checkpoint").generate(prompts, SamplingParams(...))`; or a Hugging Face
    Hub id, `LLM("org/name", revision=..., download_dir=...)`."""

    def __init__(self, model: str, **engine_args):
        """engine_args: any field of EngineArgs (block_size, max_num_seqs, enable_prefix_caching,
        memory_manager, tensor_parallel_size, data_parallel_size, ...), by keyword, as vLLM's LLM
        takes them. data_parallel_size > 1 serves through D engines behind one front."""
        args = EngineArgs(model=str(model), **engine_args)
        self.engine = make_engine(args)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in input order. A request that cannot run comes back at once with `error`
        set and no completions; the others are served."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling_params for {len(prompts)} prompts")
        return self._run(prompts, sampling_params, use_tqdm, "generate")

    def beam_search(self, prompts: PromptType | Seq[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search inside the engine, batched with whatever else runs; outputs in input
        order, each with its beam_width best sequences, best first."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        outputs = []
        for output in self._run(prompts, [params] * len(prompts), use_tqdm, "beam search"):
            outputs.append(BeamSearchOutput(
                sequences=[BeamSearchSequence(output.prompt_token_ids + c.token_ids, c.cumulative_logprob, c.text,
                                              c.finish_reason) for c in output.outputs],
                error=output.error))
        return outputs

    def _run(self, prompts, params, use_tqdm: bool, desc: str) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, request_params in zip(prompts, params):
            request_id = str(next(self._ids))
            order.append(request_id)
            try:
                self.engine.add_request(request_id, prompt, request_params)
            except ValueError as error:
                results[request_id] = _failed(request_id, prompt, str(error))
        with _peers_alive(), tqdm(total=len(order), desc=desc, disable=not use_tqdm) as bar:
            if jax.process_count() > 1:
                _check_same_everywhere(prompts, params)
            bar.update(len(results))
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        return [results[request_id] for request_id in order]

    def stats(self) -> dict:
        return self.engine.stats()

    def kv_snapshot(self) -> KVSnapshot:
        """The paged KV cache between steps (LLMEngine.kv_snapshot): step `llm.engine` to watch
        it work. With data_parallel_size > 1 each engine has its own cache."""
        return self.engine.kv_snapshot()


@contextlib.contextmanager
def _peers_alive():
    """Under jax.distributed, a collective that fails means a peer process died or left: say
    so. (A dead peer's connections close, so the collective fails at once; a peer that hangs
    is declared dead by the coordination service after jax.distributed.initialize's
    heartbeat_timeout_seconds, and the survivors terminate.)"""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        if jax.process_count() == 1:
            raise
        raise _peer_failure(error) from error


def _peer_failure(error: Exception) -> RuntimeError:
    return RuntimeError(f"process {jax.process_index()} of {jax.process_count()}: a collective failed, so a peer "
                        f"process has died or left the jax.distributed job ({error})")


def _check_same_everywhere(prompts, params) -> None:
    """Under jax.distributed every process runs this same call (SPMD) and, from the same
    requests, schedules the same steps; different arguments would make them diverge (wrong
    outputs or a hang), so they are compared first, one small collective per call."""
    digest = hashlib.sha256(repr((list(prompts), list(params))).encode()).digest()
    try:
        multihost_utils.assert_equal(np.frombuffer(digest, np.uint32),
                                     "LLM.generate was called with different prompts or parameters in different "
                                     "processes; under jax.distributed every process makes the same call")
    except ValueError as error:  # the gather itself failed (different arguments raise AssertionError)
        raise _peer_failure(error) from error


def _failed(request_id: str, prompt, error: str) -> RequestOutput:
    text = prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None)
    ids = list(prompt.get("prompt_token_ids", [])) if isinstance(prompt, dict) else []
    return RequestOutput(request_id=request_id, prompt=text, prompt_token_ids=ids, outputs=[], finished=True,
                         metrics=RequestMetrics(arrival_time=0.0), error=error)
