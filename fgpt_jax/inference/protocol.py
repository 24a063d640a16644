"""OpenAI's wire format for the server: request models, the error object, limits, and the text of a choice.

Kept apart from the app (server.py) so the HTTP plumbing and the protocol each stay one concern.
Request models ignore unknown fields (as OpenAI does) and take null as "the default".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fgpt_jax.inference.generator import TextStreamer


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past these the answer is 413 (sizes) or 422 (n, stop)."""

    max_body_bytes: int = 1 << 20
    max_messages: int = 256  # chat messages, or prompts in one completions request
    max_message_chars: int = 100_000
    max_n: int = 8
    max_stop: int = 4  # as OpenAI


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
    model_config = ConfigDict(extra="ignore")  # OpenAI ignores fields it does not know


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
    prompt: str | list[str]


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
