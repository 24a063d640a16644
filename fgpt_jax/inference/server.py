"""An OpenAI-compatible HTTP API over the batching engine, and the web chat page (`python -m fgpt_jax.serve`).

Routes: `GET /` (the chat page, fgpt_jax/inference/web/), `GET /health`, `GET /v1/models[/{id}]`,
`POST /v1/chat/completions` and `POST /v1/completions`, each streaming (server-sent events) or not.
The wire format is OpenAI's, so its clients work unchanged; `top_k` is accepted as vLLM and llama.cpp
accept it (0 or -1 = off). Every request is decoded by the shared `Engine`, so concurrent requests
share one decode batch. The wire format's models and the text of a choice live in protocol.py.

Errors are OpenAI's error object `{"error": {"message", "type", "param", "code"}}` with the status:
401 missing or wrong bearer key (with `api_key`), 413 a body, message count or message over the limits,
400 malformed JSON (nested too deeply included) or a request this server can never run (max_tokens
past the context, conversation shape, more generations (n x prompts) than its batch and queue hold,
a token id outside the vocabulary, an echo/logprobs prompt that does not fit, streaming with echo or
logprobs),
422 a body that does not match the schema (strict types, ranges), 404 an unknown model or route,
503 the engine's queue is full for now (with `Retry-After`) or the engine has stopped. Unknown fields
are ignored, as OpenAI does. Limits on connections themselves (slow clients, their number) are the
HTTP server's: connections.py.

`/v1/completions` also takes what lm-evaluation-harness's `local-completions` model sends: token-id
prompts (a list of ids, or a list of such lists), `echo` (the prompt comes back before the
completion), `logprobs: k` (OpenAI's legacy `logprobs` object, up to `Limits.max_logprobs`) and
`max_tokens: 0`. Those requests never cut the prompt (it must fit: a 400 `context_length_exceeded`
otherwise) and get their log-probabilities from the evaluations' span scorer (logprobs.py), so a task
scores over HTTP as `python -m fgpt_jax.eval harness` scores it in process.

Chat requests render with the tokenizer's chat template (user text is always ordinary text: typing
"<|assistant|>" cannot open a turn). A conversation longer than the context drops its oldest
exchanges first, keeping the system message, exactly as `ChatSession` does; the response says so in
a top-level `trimmed` object (`{"messages": dropped, "prompt_tokens": cut}`), also sent on the first
streamed chunk. Streamed deltas never end inside a UTF-8 character (TextStreamer holds partial bytes)
nor inside a possible `stop` string (held back until it is decided).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fgpt_jax.inference.engine import Engine, EngineBusy, EngineClosed, SamplingParams
from fgpt_jax.inference.logprobs import PromptScorer, TokenScores, legacy_logprobs
from fgpt_jax.inference.protocol import (
    APIError,
    ChatRequest,
    ChoiceText,
    CompletionRequest,
    Limits,
    RequestBody,
    SamplingFields,
    parse_request,
)
from fgpt_jax.tokenizer import get_tokenizer

WEB_DIR = Path(__file__).parent / "web"


class Inbox:
    """Tokens from the engine thread to a request's coroutine: appended to a deque, with one event-loop
    wake-up per burst instead of one per token (the loop serves every stream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.ready, self.armed = loop, collections.deque(), asyncio.Event(), False

    def put(self, item) -> None:  # engine thread
        self.items.append(item)
        if not self.armed:  # checked after appending: a concurrent drain either sees the item or re-arms
            self.armed = True
            self.loop.call_soon_threadsafe(self.ready.set)

    async def take(self) -> list:
        """Everything that arrived since the last call (waits for at least a wake-up)."""
        await self.ready.wait()
        self.ready.clear()
        self.armed = False
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out


class EventStream(StreamingResponse):
    """A StreamingResponse that watches for the client leaving on every ASGI version and always closes
    its iterator, so the requests behind a dropped stream are cancelled at once (freeing their slots)."""

    async def __call__(self, scope, receive, send) -> None:
        async def watch(cancel_scope):
            await self.listen_for_disconnect(receive)
            cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, tg.cancel_scope)
                try:
                    await self.stream_response(send)
                except OSError:
                    pass
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


# ---- the app ----


class Server:
    """The app's state: the engine, the model's name and kind, the key and the limits."""

    def __init__(
        self,
        engine: Engine,
        model_id: str,
        instruction_tuned: bool,
        api_key: str | None = None,
        limits: Limits = Limits(),
    ):
        self.engine, self.model_id, self.instruction_tuned = engine, model_id, instruction_tuned
        self.api_key, self.limits = api_key, limits
        self.tok = get_tokenizer()
        self.block, self.vocab = engine.config.block_size, engine.config.vocab_size
        self.created = int(time.time())
        self._prompt_scorer: PromptScorer | None = None

    def prompt_scorer(self) -> PromptScorer:
        """The scorer of `echo` and `logprobs` requests, built on first use (most servers never need it)."""
        if self._prompt_scorer is None:
            e = self.engine
            self._prompt_scorer = PromptScorer(e.graphdef, e.params, self.block, max_rows=self.limits.max_score_rows)
        return self._prompt_scorer

    # -- checks shared by both endpoints --
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(
                401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    async def body(self, request: Request, model: type[RequestBody]) -> RequestBody:
        self.check_key(request)
        limit = self.limits.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise APIError(413, f"Request body larger than {limit} bytes.", code="request_too_large")
        raw = bytearray()
        try:
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise APIError(413, f"Request body larger than {limit} bytes.", code="request_too_large")
        except ClientDisconnect:  # nobody to answer; the HTTP layer logs it (rate-limited), no traceback
            raise APIError(400, "The client left before sending the whole request body.") from None
        body = parse_request(bytes(raw), model)
        if body.model is not None and body.model != self.model_id:
            raise APIError(
                404,
                f"The model '{body.model}' does not exist; this server serves '{self.model_id}'.",
                param="model",
                code="model_not_found",
            )
        return body

    def sampling(self, body: SamplingFields) -> tuple[list[SamplingParams], list[str]]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > self.limits.max_stop:
            raise APIError(422, f"stop: at most {self.limits.max_stop} sequences", param="stop")
        n = body.n or 1
        if n > self.limits.max_n:
            raise APIError(422, f"n: at most {self.limits.max_n}", param="n")
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = min(256, self.block // 2) if requested is None else requested  # the chat CLI's default
        if max_tokens >= self.block:
            raise APIError(
                400,
                f"max_tokens {max_tokens}: this model's context is {self.block} tokens, so at most "
                f"{self.block - 1} new tokens fit",
                param="max_tokens",
                code="context_length_exceeded",
            )
        seed = secrets.randbits(32) if body.seed is None else body.seed % 2**32
        temperature = 1.0 if body.temperature is None else body.temperature
        params = [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=min(max(body.top_k or 0, 0), self.vocab),  # past the vocabulary: no filter
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=(seed + i) % 2**32,
            )
            for i in range(n)
        ]
        return params, stops

    def chat_prompt(self, body: ChatRequest, max_tokens: int) -> tuple[list[int], int]:
        """(prompt ids, messages dropped): ChatSession's rule, oldest exchanges first, system kept."""
        if len(body.messages) > self.limits.max_messages:
            raise APIError(413, f"messages: at most {self.limits.max_messages} messages", param="messages")
        msgs = []
        for i, m in enumerate(body.messages):
            text = m.text()
            if len(text) > self.limits.max_message_chars:
                raise APIError(
                    413,
                    f"messages.{i}.content: at most {self.limits.max_message_chars} characters",
                    param=f"messages.{i}.content",
                )
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        if msgs[-1]["role"] != "user":
            raise APIError(400, "messages: the conversation must end with a user message", param="messages")
        system, history = (msgs[:1], msgs[1:]) if msgs[0]["role"] == "system" else ([], msgs)
        budget, dropped = self.block - max_tokens, 0
        while True:
            try:
                ids, _ = self.tok.render_chat(system + history, add_generation_prompt=True)
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
            if len(ids) <= budget or len(history) <= 1:
                return ids, dropped
            cut = 2 if len(history) > 2 else 1
            history, dropped = history[cut:], dropped + cut

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        """The prompts as token ids: text is encoded as ordinary text (an empty one starts a new document,
        as GPT-2 was trained: after <|endoftext|>); token ids are taken as they are, each checked to be
        one the tokenizer has (special tokens included)."""
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt or len(prompt) > self.limits.max_messages:
            raise APIError(
                413 if prompt else 422, f"prompt: between 1 and {self.limits.max_messages} prompts", param="prompt"
            )
        if any(len(p) > self.limits.max_message_chars for p in prompt):
            unit = "characters" if isinstance(prompt[0], str) else "tokens"
            raise APIError(413, f"prompt: at most {self.limits.max_message_chars} {unit}", param="prompt")
        if isinstance(prompt[0], str):
            return [self.tok.encode(p) or [self.tok.eot_id] for p in prompt]
        for i, ids in enumerate(prompt):
            where = "prompt" if isinstance(body.prompt[0], int) else f"prompt.{i}"
            if not ids:
                raise APIError(422, f"{where}: a list of token ids needs at least one id", param=where)
            bad = next((j for j, t in enumerate(ids) if not 0 <= t < self.tok.n_vocab), None)
            if bad is not None:
                raise APIError(
                    400,
                    f"{where}.{bad}: token id {ids[bad]} is not in this model's vocabulary [0, {self.tok.n_vocab})",
                    param=f"{where}.{bad}",
                    code="invalid_token_id",
                )
        return [list(p) for p in prompt]

    # -- running --
    def submit(self, prompts: list[list[int]], params: list[SamplingParams]):
        """Submit every (prompt, choice) pair; all or none. Returns (requests, queue of (choice, token)).
        More pairs than the engine ever holds is the client's error (400, not retried); a queue full for
        now is a 503 the client may retry."""
        eng, total = self.engine, len(prompts) * len(params)
        if total > eng.max_batch + eng.max_queue:
            raise APIError(
                400,
                f"n={len(params)} x {len(prompts)} prompt(s) = {total} generations: this server takes at most "
                f"{eng.max_batch + eng.max_queue} at once (max batch {eng.max_batch} + max queue {eng.max_queue})",
                param="n" if len(params) > 1 else "prompt",
            )
        events = Inbox(asyncio.get_running_loop())
        reqs = []

        def listener_for(i):
            return lambda req, tok: events.put((i, tok))

        try:
            for p in prompts:
                for sp in params:
                    reqs.append(self.engine.submit(p, sp, listener_for(len(reqs))))
        except (EngineBusy, EngineClosed) as e:
            for r in reqs:
                r.cancel()
            busy = isinstance(e, EngineBusy)
            raise APIError(
                503,
                f"Server {'busy' if busy else 'stopped'}: {e}",
                code="server_busy" if busy else "engine_stopped",
                kind="server_error",
            ) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return reqs, events

    async def run(
        self,
        request: Request,
        kind: str,
        body: SamplingFields,
        prompts: list[list[int]],
        params: list[SamplingParams],
        stops: list[str],
        dropped: int,
    ) -> Response:
        reqs, events = self.submit(prompts, params)
        cut = max(r.dropped_prompt_tokens for r in reqs)
        trimmed = {"messages": dropped, "prompt_tokens": cut} if dropped or cut else None
        headers = {"X-Context-Trimmed": f"messages={dropped}; prompt_tokens={cut}"} if trimmed else None
        meta = dict(
            id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_id,
        )
        texts = [ChoiceText(stops) for _ in reqs]
        usage = lambda: {
            "prompt_tokens": sum(len(r.prompt) for r in reqs[:: len(params)]),
            "completion_tokens": sum(r.generated for r in reqs),
            "total_tokens": sum(len(r.prompt) for r in reqs[:: len(params)]) + sum(r.generated for r in reqs),
        }
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self.stream(kind, reqs, events, texts, meta, usage, include_usage, trimmed)
            return EventStream(stream, media_type="text/event-stream", headers=headers)
        await self.collect(request, reqs, events, texts)
        choices = []
        for i, (r, t) in enumerate(zip(reqs, texts)):
            reason = self.finish(r, t)
            if kind == "chat":
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": t.text},
                        "logprobs": None,
                        "finish_reason": reason,
                    }
                )
            else:
                choices.append({"index": i, "text": t.text, "logprobs": None, "finish_reason": reason})
        out = {
            **meta,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage(),
        }
        if trimmed:
            out["trimmed"] = trimmed
        return JSONResponse(out, headers=headers)

    @staticmethod
    async def collect(request: Request, reqs, events: Inbox, texts: list[ChoiceText]) -> list[list[int]]:
        """Wait for every request to finish (a client that leaves cancels them all); push each token into
        its choice's text. Returns each choice's tokens up to the one that completed a `stop` string
        (or its last), then the stop token that ended it, if any: what its log-probs cover."""
        shown: list[list[int]] = [[] for _ in reqs]
        try:
            async with anyio.create_task_group() as tg:

                async def watch():
                    while (await request.receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                open_ = len(reqs)
                while open_:
                    for i, tok in await events.take():
                        if tok is None:
                            open_ -= 1
                            continue
                        if not texts[i].stopped:
                            shown[i].append(tok)
                        texts[i].push(tok)
                        if texts[i].stopped:
                            reqs[i].cancel("stop")
                tg.cancel_scope.cancel()
        finally:
            for r in reqs:
                r.cancel()
        for r, t, toks in zip(reqs, texts, shown):
            if r.stop_token is not None and not t.stopped:
                toks.append(r.stop_token)
        return shown

    @staticmethod
    def finish(r, t: ChoiceText) -> str:
        """A choice's finish_reason once its request is done (its held-back text flushed)."""
        t.finish()
        if r.finish_reason == "error":
            raise APIError(503, "The engine stopped while decoding.", kind="server_error")
        return "length" if r.finish_reason == "length" else "stop"

    async def stream(self, kind, reqs, events, texts, meta, usage, include_usage, trimmed) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        pending_trim = [trimmed]  # said once, on the first chunk

        def chunk(i, content=None, finish=None, first=False):
            if kind == "chat":
                delta = (
                    {"role": "assistant", "content": ""} if first else ({} if content is None else {"content": content})
                )
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": content or "", "logprobs": None, "finish_reason": finish}
            out = {**meta, "object": obj, "system_fingerprint": None, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            if pending_trim[0]:
                out["trimmed"], pending_trim[0] = pending_trim[0], None
            return f"data: {json.dumps(out)}\n\n"

        try:
            if kind == "chat":
                for i in range(len(reqs)):
                    yield chunk(i, first=True)
            open_ = len(reqs)
            while open_:  # one write per burst: what arrived together goes out together, a delta per choice
                out, pieces, ended = [], {}, []
                for i, tok in await events.take():
                    if tok is None:
                        ended.append(i)
                        continue
                    pieces[i] = pieces.get(i, "") + texts[i].push(tok)
                    if texts[i].stopped:
                        reqs[i].cancel("stop")
                out += [chunk(i, piece) for i, piece in pieces.items() if piece]
                for i in ended:
                    open_ -= 1
                    if reqs[i].finish_reason == "error":
                        err = {
                            "message": "The engine stopped while decoding.",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                        yield "".join(out) + f"data: {json.dumps({'error': err})}\n\n"
                        return
                    tail = texts[i].finish()
                    if tail:
                        out.append(chunk(i, tail))
                    out.append(chunk(i, finish="length" if reqs[i].finish_reason == "length" else "stop"))
                if out:
                    yield "".join(out)
            if include_usage:
                last = {**meta, "object": obj, "system_fingerprint": None, "choices": [], "usage": usage()}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                r.cancel()

    # -- endpoints --
    async def chat(self, request: Request) -> Response:
        body = await self.body(request, ChatRequest)
        params, stops = self.sampling(body)
        ids, dropped = self.chat_prompt(body, params[0].max_tokens)
        return await self.run(request, "chat", body, [ids], params, stops, dropped)

    async def completions(self, request: Request) -> Response:
        body = await self.body(request, CompletionRequest)
        params, stops = self.sampling(body)
        prompts = self.completion_prompts(body)
        if body.echo or body.logprobs is not None or params[0].max_tokens == 0:
            return await self.scored(request, body, prompts, params, stops)
        return await self.run(request, "text", body, prompts, params, stops, 0)

    async def scored(
        self,
        request: Request,
        body: CompletionRequest,
        prompts: list[list[int]],
        params: list[SamplingParams],
        stops: list[str],
    ) -> Response:
        """A completion with `echo`, `logprobs` or `max_tokens` 0: the prompt is never cut (it must fit),
        and log-probs come from the scorer (logprobs.py). `max_tokens` 0, or 1 at temperature 0 (what
        lm-eval's loglikelihood requests send), is answered by one scoring pass alone: the new token is
        the argmax after the prompt. Otherwise the engine generates as usual and prompt + completion
        are then scored, so `logprobs` are the model's own (temperature 1, no top-k/top-p filter)."""
        k = body.logprobs
        if k is not None and k > self.limits.max_logprobs:
            raise APIError(422, f"logprobs: at most {self.limits.max_logprobs}", param="logprobs")
        if body.stream:
            raise APIError(
                400, "stream: echo, logprobs and max_tokens 0 are answered whole; send stream: false", param="stream"
            )
        max_tokens, greedy = params[0].max_tokens, params[0].temperature == 0
        direct = max_tokens == 0 or (max_tokens == 1 and greedy)
        for i, p in enumerate(prompts):
            # The scorer reads a prompt of up to block_size + 1 tokens whole (the last is only a target);
            # the engine holds prompt + new tokens within block_size.
            if (len(p) > self.block + 1) if direct else (len(p) + max_tokens > self.block):
                raise APIError(
                    400,
                    f"prompt {i}: {len(p)} tokens + max_tokens {max_tokens} do not fit this model's context of "
                    f"{self.block} tokens (with echo or logprobs the prompt is never cut)",
                    param="prompt",
                    code="context_length_exceeded",
                )
        scorer = self.prompt_scorer()
        top, n = max(k or 0, 1), len(params)
        owner = [i // n for i in range(len(prompts) * n)]  # each choice's prompt
        texts = [ChoiceText(stops) for _ in owner]
        if direct:
            # A placeholder target after the prompt gives the next token's scores; a prompt that fills
            # the scorer's window (block_size + 1) is scored whole and its next token read from its last
            # block_size tokens, the window the engine would keep.
            seqs, starts = [], []
            for p in prompts if k is not None or max_tokens else []:  # echo alone: nothing to score
                if max_tokens and len(p) > self.block:
                    seqs += [p, p[-self.block :] + [0]]
                    starts += [1, self.block]
                else:
                    seqs.append(p + [0] * max_tokens)
                    starts.append(1)
            parts = iter(await anyio.to_thread.run_sync(scorer.score, seqs, starts, top))
            scored, new_of = [], []
            for p in prompts:
                sc = next(parts, None)
                if max_tokens and len(p) > self.block:
                    nxt = next(parts)
                    sc = TokenScores(*(np.concatenate([getattr(sc, f), getattr(nxt, f)]) for f in TokenScores.FIELDS))
                new_of.append([int(sc.top_ids[-1, 0])] if max_tokens else [])
                if max_tokens:  # the placeholder's log-prob becomes the argmax's own
                    sc.logprobs[-1] = sc.top_logprobs[-1, 0]
                scored.append(sc)
            shown = [new_of[o] for o in owner]
            for t, new in zip(texts, shown):
                for tok in new:
                    if tok not in self.tok.stop_ids:
                        t.push(tok)
                t.finish()
            reasons = [
                "stop" if t.stopped or (new and new[-1] in self.tok.stop_ids) else "length"
                for t, new in zip(texts, shown)
            ]
            scores = [scored[o] for o in owner]
        else:
            reqs, events = self.submit(prompts, params)
            shown = await self.collect(request, reqs, events, texts)
            reasons = [self.finish(r, t) for r, t in zip(reqs, texts)]
            scores = [None] * len(owner)
            if k is not None:
                seqs = [prompts[o] + new for o, new in zip(owner, shown)]
                starts = [1 if body.echo else len(prompts[o]) for o in owner]
                scores = await anyio.to_thread.run_sync(scorer.score, seqs, starts, top)
        choices = []
        for i, (o, t, new, reason, sc) in enumerate(zip(owner, texts, shown, reasons, scores)):
            p = prompts[o]
            choice = {"index": i, "text": (self.tok.decode(p) if body.echo else "") + t.text, "logprobs": None}
            if k is not None:
                # The scored entries that belong to the tokens shown: the last m of the sequence's.
                m = len(new) + (len(p) - 1 if body.echo else 0)
                lps, ids, vals = (x[len(x) - m :] for x in (sc.logprobs, sc.top_ids, sc.top_logprobs))
                lead = [None] if body.echo else []
                choice["logprobs"] = legacy_logprobs(
                    self.tok,
                    (p if body.echo else []) + new,
                    lead + list(lps),
                    lead + [(ids[j, :k], vals[j, :k]) for j in range(m)],
                )
            choice["finish_reason"] = reason
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(new) for new in shown)
        return JSONResponse(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model_id,
                "system_fingerprint": None,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    def model_card(self) -> dict:
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "fgpt-jax",
            "max_model_len": self.block,
            "instruction_tuned": self.instruction_tuned,
        }

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        if "model" in request.path_params:
            if request.path_params["model"] != self.model_id:
                raise APIError(
                    404,
                    f"The model '{request.path_params['model']}' does not exist.",
                    param="model",
                    code="model_not_found",
                )
            return JSONResponse(self.model_card())
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def health(self, request: Request) -> Response:
        eng = self.engine
        ok = eng.error is None and not eng._closed
        return JSONResponse(
            {
                "status": "ok" if ok else "stopped",
                "model": self.model_id,
                "instruction_tuned": self.instruction_tuned,
                "running": eng.active_count(),
                "pending": eng.pending_count(),
                "peak_running": eng.peak_active,
                "max_batch": eng.max_batch,
                "finished": {k: eng.finished[k] for k in ("stop", "length", "cancelled", "error")},
            },
            status_code=200 if ok else 503,
        )

    async def page(self, request: Request) -> Response:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def _error_response(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.code == "server_busy":  # the openai client waits this long before its retry
        headers = {"Retry-After": "1"}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _api_error(request: Request, exc: APIError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {
        404: f"Unknown route {request.method} {request.url.path}.",
        405: f"Method {request.method} not allowed on {request.url.path}.",
    }.get(exc.status_code, exc.detail)
    return _error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _error_response(APIError(500, f"Internal error: {type(exc).__name__}", kind="server_error"))


def create_app(
    engine: Engine, model_id: str, instruction_tuned: bool, api_key: str | None = None, limits: Limits = Limits()
) -> Starlette:
    """The ASGI app serving `engine` as `model_id` (the engine's lifetime stays the caller's)."""
    s = Server(engine, model_id, instruction_tuned, api_key, limits)
    routes = [
        Route("/", s.page),
        Route("/health", s.health),
        Route("/v1/models", s.models),
        Route("/v1/models/{model:path}", s.models),
        Route("/v1/chat/completions", s.chat, methods=["POST"]),
        Route("/v1/completions", s.completions, methods=["POST"]),
        Mount("/static", StaticFiles(directory=WEB_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes, exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    )
    app.state.server = s
    return app
