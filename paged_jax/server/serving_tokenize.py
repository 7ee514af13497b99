"""vLLM's /tokenize and /detokenize: the model's tokenizer over HTTP, without the engine, so a
client can count a prompt's tokens against max_model_len before sending it. Messages are
rendered with the chat template exactly as /v1/chat/completions renders them.
"""

from __future__ import annotations

from collections.abc import Sequence

from paged_jax.engine.async_llm_engine import AsyncLLMEngine
from paged_jax.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from paged_jax.server.serving import APIError, OpenAIServing
from paged_jax.server.serving_chat import OpenAIServingChat


class OpenAIServingTokenization(OpenAIServing):
    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str], chat: OpenAIServingChat):
        super().__init__(engine, served_model_names)
        self.chat = chat  # renders messages

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        tokenizer = self.need_tokenizer("tokenize")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt or messages", "prompt")
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        else:
            text = self.chat.render_chat(body.messages, body.add_generation_prompt, {})
            ids = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        tokenizer = self.need_tokenizer("detokenize")
        self.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))
