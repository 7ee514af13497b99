"""The OpenAI wire format (and vLLM's extensions to it), as pydantic models: what the server
accepts and what it returns, with OpenAI's field names.

No request field is silently ignored: one the server does not implement (OpenAI's `suffix`,
vLLM's `use_beam_search`, or one nobody defines, such as a misspelt `temprature`) is a 400
naming it, in vLLM's words for `suffix`: "suffix is not currently supported". (vLLM accepts
such fields and only logs them, so a client believes it got what it asked for.) Two kinds
pass undeclared: a request's INERT_FIELDS, which change nothing this server does, and a field
sent as null, which asks for nothing (some clients send every field they know, unset ones as
null). A declared field of the wrong type is a 400 naming it. Types are strict,
as JSON has them: `true` or `"7"` is not a token id, `"0.5"` is not a temperature (an integer
is a float), and NaN or infinity is no number. Sampling values are checked once, by
SamplingParams, so the server and the offline API reject the same things with the same words.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_serializer,
    model_validator,
)

TokenIds = list[StrictInt]


class OpenAIModel(BaseModel):
    """A request object: a field it does not declare is refused (pydantic's extra_forbidden,
    which describe_validation_error words), unless it is inert or null."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    INERT_FIELDS: ClassVar[frozenset[str]] = frozenset()  # accepted and dropped: they change nothing here

    @model_validator(mode="before")
    @classmethod
    def _without_what_asks_nothing(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if k in cls.model_fields or (k not in cls.INERT_FIELDS and v is not None)}


# -- errors --------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- models ----------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "paged-jax"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- sampling fields shared by completions and chat ------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: StrictBool = False


class JsonSchemaFormat(OpenAIModel):
    """OpenAI's response_format.json_schema: the output is JSON valid against `schema`."""

    name: StrictStr
    description: StrictStr | None = None
    schema_: dict | None = Field(None, alias="schema")  # `schema` would shadow pydantic's own
    strict: StrictBool | None = None  # the grammar is always strict: only what the schema allows


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(OpenAIModel):
    """vLLM's `structured_outputs` request field: one grammar the output follows (exactly one
    set: StructuredOutputsParams checks)."""

    json_: dict | StrictStr | None = Field(None, alias="json")  # `json` would shadow pydantic's own
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None


class SamplingFields(OpenAIModel):
    """OpenAI's sampling fields and vLLM's extensions (top_k, min_p, repetition_penalty,
    ignore_eos, min_tokens, stop_token_ids, ...), with vLLM's defaults."""

    model: StrictStr | None = None
    n: StrictInt = 1
    best_of: StrictInt | None = None  # only n or 1: see OpenAIServing.check_best_of
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: TokenIds | None = None
    presence_penalty: StrictFloat = 0.0
    frequency_penalty: StrictFloat = 0.0
    repetition_penalty: StrictFloat = 1.0
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None  # vLLM's
    logit_bias: dict[StrictStr, StrictFloat] | None = None  # token id (a string, as JSON keys are) -> bias


# -- completions -----------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    INERT_FIELDS = frozenset({"user"})  # names the end user for OpenAI's abuse monitoring

    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16  # 0 only with echo: the prompt alone, as vLLM allows (for scoring)
    logprobs: StrictInt | None = None  # how many top tokens to return with each (with echo, the prompt's too)
    echo: StrictBool = False


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended it


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# -- chat ------------------------------------------------------------------------------------------


class ContentPart(OpenAIModel):
    """One part of a message's content. Its other fields are its type's (`image_url`,
    `input_audio`, ...), so they pass here and render_chat refuses what it cannot take: every
    part but text, and a field beside a text part's text. (Forbidden here, such a field's 400
    would say instead that the content is not a string, the other member of its union.)"""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class FunctionCall(OpenAIModel):
    name: StrictStr
    arguments: StrictStr  # a JSON object, as text


class ToolCall(OpenAIModel):
    """A function call the assistant made: in a response, and in an assistant message a client
    sends back with the conversation."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's
    tool_call_id: StrictStr | None = None  # a tool result's (role "tool"): the call it answers


class FunctionDefinition(OpenAIModel):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: StrictBool | None = None  # the grammar is always strict


class Tool(OpenAIModel):
    type: Literal["function"]  # OpenAI's only kind of tool that chat completions take
    function: FunctionDefinition


class FunctionName(OpenAIModel):
    name: StrictStr


class NamedToolChoice(OpenAIModel):
    """tool_choice {"type": "function", "function": {"name": ...}}: call that function."""

    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    # `user` and `safety_identifier` name the end user for OpenAI's abuse monitoring; `store` and
    # `metadata` keep the completion at OpenAI (this server keeps none); `service_tier` picks
    # OpenAI's processing tier and `prompt_cache_key` its prompt cache (prefix caching here needs
    # no key); `parallel_tool_calls` vLLM also leaves to the model.
    INERT_FIELDS = frozenset({"user", "safety_identifier", "store", "metadata", "service_tier", "prompt_cache_key",
                              "parallel_tool_calls"})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # None: up to max_model_len
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True  # vLLM extension
    chat_template_kwargs: dict | None = None  # vLLM extension: extra template variables
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools


class ResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)  # vLLM's default: a list, empty


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: its id, type and name come in its first delta, its
    arguments in pieces after; `index` says which of the message's calls it belongs to."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer
    def _without_nulls(self) -> dict:
        """OpenAI's deltas carry only what changed: the role once, then content or pieces of
        tool calls."""
        delta = {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}
        if self.tool_calls:
            delta["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        return delta


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# -- tokenizer endpoints (vLLM's) --------------------------------------------------------------------


class TokenizeRequest(OpenAIModel):
    """Either a prompt or chat messages (rendered with the chat template first)."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: StrictBool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: StrictStr | None = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
