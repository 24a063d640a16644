"""OpenAI's wire format for the server: request models, the error object, limits, and the text of a choice.

Kept apart from the app (server.py) so the HTTP plumbing and the protocol each stay one concern.
Request models ignore unknown fields (as OpenAI does) and take null as "the default". Types are
strict, as OpenAI's are: `max_tokens: true`, `"0.5"` for a number or `1.5` for an integer are 422s
naming the field (an integer is a number, so `temperature: 1` is taken).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fgpt_jax.inference.generator import TextStreamer


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past these the answer is 413 (sizes) or 422 (n, stop)."""

    max_body_bytes: int = 1 << 20
    max_messages: int = 256  # chat messages, or prompts in one completions request
    max_message_chars: int = 100_000
    max_n: int = 8
    max_stop: int = 4  # as OpenAI
    max_logprobs: int = 20  # top log-probs per token in /v1/completions (OpenAI's legacy API: 5; vLLM: 20)
    max_score_rows: int = 16  # sequences per scoring batch for echo / logprobs (memory: rows x context)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request models ----


class RequestBody(BaseModel):
    # OpenAI ignores fields it does not know, and coerces no types (strict: bool is not an int, a
    # string is not a number; an int is still a float).
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(RequestBody):
    include_usage: bool = False


class SamplingFields(RequestBody):
    """The sampling fields of both endpoints; null means the default, as in OpenAI's API."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # default 1
    top_p: float | None = Field(None, gt=0.0, le=1.0)  # default 1 (off)
    top_k: int | None = Field(None, ge=-1)  # default 0; 0 or -1: off
    max_tokens: int | None = Field(None, ge=1)  # default min(256, context / 2), as the chat CLI
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    stop: str | list[str] | None = None
    seed: int | None = None  # any integer, taken modulo 2**32; default: a random one
    n: int | None = Field(None, ge=1)  # default 1
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    # Text, several texts, token ids, or several lists of token ids (what lm-eval's local-completions sends).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: no new tokens (with echo: score the prompt only)
    echo: bool | None = None  # the prompt comes back before the completion (with its log-probs)
    logprobs: int | None = Field(None, ge=0)  # the log-prob of each token and its `logprobs` most likely


MAX_INT_DIGITS = 4300  # Python's own limit for int(str); past it json.loads raises a bare ValueError


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json would read NaN and Infinity as floats


def _param(loc: tuple) -> str | None:
    """The field a pydantic error is about, as OpenAI names it ("messages.0.content"): union members'
    tags ("str", "list[str]", "TextPart", ...), which pydantic puts in the location, are left out."""
    parts = [
        str(p)
        for p in loc
        if isinstance(p, int) or not (p in ("str", "int", "float", "bool") or "[" in p or p[:1].isupper())
    ]
    return ".".join(parts) or None


def parse_request(raw: bytes, model: type[RequestBody]) -> RequestBody:
    """The request `model` from a JSON body, or the APIError OpenAI would answer: 400 for a body that is
    not JSON (nested too deeply, NaN, a 5,000-digit number included) or not an object, 422 naming a
    field that does not match the schema."""
    try:
        data = json.loads(raw, parse_int=_int, parse_constant=_no_constant)
    except RecursionError:  # the C parser's recursion guard: depth ~ the interpreter's recursion limit
        raise APIError(400, "We could not parse the JSON body of your request: nested too deeply.") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
        raise APIError(400, f"We could not parse the JSON body of your request: {e}.") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # Of a union's failures, the member that matched deepest says most ("content.0.text", not "content").
        err = max(e.errors(include_url=False), key=lambda err: len(err["loc"]))
        param = _param(err["loc"])
        raise APIError(422, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None


# ---- text of one choice: UTF-8-safe pieces, stop strings held back ----


class ChoiceText:
    """Turns a choice's tokens into text deltas; finds `stop` strings across token boundaries."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.bytes = TextStreamer()
        self.held = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _emit(self, piece: str) -> str:
        self.held += piece
        hits = [(i, s) for s in self.stops if (i := self.held.find(s)) >= 0]
        if hits:
            out, self.held, self.stopped = self.held[: min(hits)[0]], "", True
        else:  # hold back the longest tail that could still become a stop string
            keep = max(
                (
                    k
                    for s in self.stops
                    for k in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:k])
                ),
                default=0,
            )
            out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        self.text += out
        return out

    def push(self, token: int) -> str:
        return "" if self.stopped else self._emit(self.bytes.push(token))

    def finish(self) -> str:
        """The rest of the text once the choice has ended (held-back text included)."""
        if self.stopped:
            return ""
        out = self._emit(self.bytes.flush())
        if not self.stopped:
            self.text += self.held
            out, self.held = out + self.held, ""
        return out
