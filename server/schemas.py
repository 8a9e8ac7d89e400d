"""msgspec Structs for what goes over the wire: OpenAI's chat completions,
Responses and models shapes, and the error object every failure answers with.

Requests ignore fields they do not know (clients send many); the values they do
know are checked here, so a bad one is a 400 naming the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

# --- errors


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct):
    error: ErrorBody


class OllamaError(Struct):
    error: str


class APIError(Exception):
    """Raised by a controller; answered as an OpenAI error object with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorBody(self.message, self.type, self.param, self.code))


# --- request value types

def bounded(kind, ge=None, gt=None, le=None, description=None):
    """`kind` within bounds; a bound of zero is also written into the OpenAPI schema
    by hand (Litestar's schema generation drops falsy bounds)."""
    zeros = {key: 0 for key, v in (("minimum", ge), ("exclusive_minimum", gt)) if v == 0}
    return Annotated[kind, Meta(ge=ge, gt=gt, le=le, description=description,
                                extra_json_schema={"extra": zeros} if zeros else None)]


Temperature = bounded(float, ge=0.0, le=2.0, description="0 is greedy")
TopP = bounded(float, gt=0.0, le=1.0)
TopK = Annotated[int, Meta(ge=-1, description="0 or -1: off")]
MinP = bounded(float, ge=0.0, le=1.0)
RepetitionPenalty = bounded(float, gt=0.0, le=10.0)
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
TopLogprobs = bounded(int, ge=0, le=20)
Thinking = Literal["on", "off", "auto"]
Role = Literal["system", "developer", "user", "assistant", "tool"]
ReasoningFormat = Literal["auto", "separate", "parsed", "deepseek", "inline", "none"]


class Options(Struct, kw_only=True):
    """What both APIs accept beyond their own fields: the sampling values (top_k and
    the rest are extensions to OpenAI's) and every spelling of thinking on/off."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    thinking: Thinking | bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None

    def sampling(self) -> dict:
        """The values for the engine; None means the model's default."""
        top_k = self.top_k if self.top_k is None or self.top_k > 0 else 0
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=top_k, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty, seed=self.seed)

    def thinking_mode(self, effort: str | None = None) -> str:
        """on | off | auto, from the spellings in order of precedence (DESIGN.md);
        `effort` is the Responses API's reasoning.effort."""
        if self.thinking is not None:
            return self.thinking if isinstance(self.thinking, str) else ("on" if self.thinking else "off")
        kwargs = self.chat_template_kwargs or {}
        if "enable_thinking" in kwargs:
            value = kwargs["enable_thinking"]
            if not isinstance(value, bool):
                raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false",
                               param="chat_template_kwargs.enable_thinking", code="invalid_value")
            return "on" if value else "off"
        for e in (self.reasoning_effort, effort):
            if e is not None:
                return "off" if e.lower() == "none" else "on"
        return "auto"


# --- chat completions: request


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class ChatRequest(Options, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Meta(ge=1, le=16)] | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    reasoning_format: ReasoningFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None


# --- chat completions: response


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct):
    content: list[TokenLogprob] | None


class FunctionCall(Struct, kw_only=True):
    name: str | UnsetType = UNSET
    arguments: str


class ToolCallOut(Struct, kw_only=True):
    index: int | UnsetType = UNSET  # in a chunk's delta
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET
    function: FunctionCall


class AssistantMessage(Struct, kw_only=True):
    role: str = "assistant"
    content: str | None
    reasoning_content: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


class Choice(Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class PromptTokensDetails(Struct):
    cached_tokens: int


class CompletionTokensDetails(Struct):
    reasoning_tokens: int


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(Struct, kw_only=True):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


class ChunkChoice(Struct, kw_only=True):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None | UnsetType = UNSET  # null on every chunk when include_usage, set on the last


# --- completions (text, no chat template)


class CompletionRequest(Options, kw_only=True):
    prompt: str | list[Any]  # a string, strings, token ids, or lists of token ids (checked by the route)
    model: str | None = None
    max_tokens: bounded(int, ge=0) | None = 16  # OpenAI's default
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Meta(ge=1, le=16)] | None = None
    echo: bool = False
    logprobs: TopLogprobs | None = None
    suffix: str | None = None
    best_of: int | None = None
    user: str | None = None


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Struct, kw_only=True):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None | UnsetType = UNSET
    system_fingerprint: str | None = None


# --- responses: request


class InputPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class InputItem(Struct, kw_only=True):
    type: str | None = None  # "message" (or left out), "reasoning", "function_call", "function_call_output"
    role: Role | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None  # function_call, function_call_output
    name: str | None = None  # function_call
    arguments: str | None = None  # function_call
    output: str | list[InputPart] | None = None  # function_call_output


class ReasoningOptions(Struct, kw_only=True):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(Options, kw_only=True):
    input: str | list[InputItem]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    reasoning: ReasoningOptions | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    stop: str | list[str] | None = None


# --- responses: response


class OutputText(Struct, kw_only=True):
    type: str = "output_text"
    text: str
    annotations: list = []
    logprobs: list = []


class ReasoningText(Struct, kw_only=True):
    type: str = "reasoning_text"
    text: str


class MessageItem(Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    role: str = "assistant"
    status: str
    content: list[OutputText]


class FunctionCallItem(Struct, kw_only=True, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


class ReasoningItem(Struct, kw_only=True, tag_field="type", tag="reasoning"):
    id: str
    summary: list = []
    content: list[ReasoningText]
    status: str


class InputTokensDetails(Struct):
    cached_tokens: int
    cache_write_tokens: int


class OutputTokensDetails(Struct):
    reasoning_tokens: int


class ResponseUsage(Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Struct):
    reason: str


class ReasoningConfig(Struct):
    effort: str | None = None
    summary: str | None = None


class TextConfig(Struct):
    format: dict[str, Any]


class ResponseObject(Struct, kw_only=True):
    id: str
    object: str = "response"
    created_at: int
    status: str  # in_progress | completed | incomplete
    completed_at: int | None = None
    model: str
    output: list[ReasoningItem | MessageItem | FunctionCallItem]
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ErrorBody | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    tool_choice: str | dict[str, Any] = "auto"
    tools: list = []
    metadata: dict[str, str] = {}
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    store: bool = False
    truncation: str = "disabled"
    background: bool = False


# --- models


class ModelCard(Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    loaded: bool = False  # an extension: the model this server answers with


class ModelList(Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class Health(Struct, kw_only=True):
    status: str  # loading | ok | draining | error
    model: str | None = None
    error: str | None = None
    active: int = 0  # requests generating now
    waiting: int = 0  # requests queued for a slot
    slots: int = 0  # sequences decoded together (--parallel)
    loaded: list[str] = []  # the models resident now
