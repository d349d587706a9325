"""What the sim-server reads from an OpenAI request body, and the text it sends back.

No tokenizer is loaded (the fleet runs without model files), so text is counted by an
approximation: one token per word (a run of letters, digits or underscores) and one per
punctuation mark, each mapped to a stable id by CRC-32, so that equal texts give equal ids
and shared text prefixes hit the prefix cache. English BPE vocabularies average about 1.3
tokens per word, so text prompts are undercounted by roughly a quarter; token-id prompts
(OpenAI's `prompt: [ids]`, what the load generator sends) are counted exactly.

Chat messages go through an approximation of Llama-3's template: a begin-of-text token, each
message as header (start, role, end, blank line) + content + end-of-turn, then the assistant
header the generation starts from.

Generated text is filler: each token one word of a fixed list (with its leading space), so
the approximation above counts it back exactly when a client resends a conversation.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

VOCAB = 128_000  # ids stay below a Llama-3-sized vocabulary
_PIECE = re.compile(r"\w+|[^\w\s]")
_BEGIN, _START_HEADER, _END_HEADER, _BLANK, _END_TURN = range(VOCAB, VOCAB + 5)
FILLER = ("the", "model", "serves", "tokens", "at", "a", "steady", "pace", "while", "each",
          "request", "waits", "its", "turn", "in", "batch")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; used for chat too


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: int


class ErrorBody(TypedDict):
    """OpenAI's error response."""

    error: ErrorDetail


class ApiError(Exception):
    """A request the OpenAI API would refuse: HTTP status, error type and message."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param

    def body(self) -> ErrorBody:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """One parsed request: the prompt's token ids and the generation settings that matter."""

    tokens: tuple[int, ...]
    max_tokens: int
    stream: bool
    include_usage: bool


def text_tokens(text: str) -> list[int]:
    return [zlib.crc32(piece.encode()) % VOCAB for piece in _PIECE.findall(text)]


def filler_text(start: int, count: int) -> str:
    """`count` filler tokens from position `start` of a request's output."""
    n = len(FILLER)
    return "".join(" " + FILLER[(start + i) % n] for i in range(count))


# The request's JSON comes from the client unchecked: these take `object` and check each part.
def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts; only text parts are read
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, "only text content parts are supported by the simulator",
                               param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise ApiError(400, "message content must be a string or a list of parts",
                   param="messages")


def chat_tokens(messages: object) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    ids = [_BEGIN]
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message needs a role", param="messages")
        ids += [_START_HEADER, *text_tokens(message["role"]), _END_HEADER, _BLANK]
        ids += text_tokens(_content_text(message.get("content")))
        ids.append(_END_TURN)
    return [*ids, _START_HEADER, *text_tokens("assistant"), _END_HEADER, _BLANK]


def completion_tokens(prompt: object) -> list[int]:
    """A completions `prompt`: text, token ids, or a batch of exactly one of those."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return text_tokens(prompt)
    if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return list(prompt)
    raise ApiError(400, "prompt must be a string or a list of token ids (batches of more "
                        "than one prompt are not supported by the simulator)", param="prompt")


def _int(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{name} must be an integer", param=name)
    return value


def parse(body: object, *, chat: bool, served_model: str, max_model_len: int) -> Prompt:
    """Check a /v1/completions or /v1/chat/completions body as vLLM would."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise ApiError(404, f"The model `{model}` does not exist.", kind="NotFoundError",
                       param="model")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n > 1 is not supported by the simulator", param="n")
    tokens = chat_tokens(body.get("messages")) if chat else completion_tokens(
        body.get("prompt"))
    if not tokens:
        raise ApiError(400, "the prompt is empty", param="prompt")
    # Chat clients may send the newer max_completion_tokens instead.
    max_tokens = _int(body, "max_tokens", None)
    if max_tokens is None:
        max_tokens = _int(body, "max_completion_tokens", DEFAULT_MAX_TOKENS)
    assert max_tokens is not None
    if max_tokens < 1:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    min_tokens = _int(body, "min_tokens", 0) or 0
    if not 0 <= min_tokens <= max_tokens:
        raise ApiError(400, f"min_tokens must be between 0 and max_tokens ({max_tokens})",
                       param="min_tokens")
    if len(tokens) + max_tokens > max_model_len:
        raise ApiError(
            400, f"This model's maximum context length is {max_model_len} tokens. However, "
                 f"you requested {len(tokens) + max_tokens} tokens ({len(tokens)} in the "
                 f"messages, {max_tokens} in the completion). Please reduce the length of the "
                 "messages or completion.", param="max_tokens")
    options = body.get("stream_options") or {}
    stream = bool(body.get("stream", False))
    return Prompt(tokens=tuple(tokens), max_tokens=max_tokens, stream=stream,
                  include_usage=stream and bool(
                      isinstance(options, dict) and options.get("include_usage")))


def first_filler(seed: int, tokens: Sequence[int]) -> int:
    """Where in the filler list a request's output starts: fixed by the seed and prompt."""
    return (seed + len(tokens) + (tokens[0] if tokens else 0)) % len(FILLER)
