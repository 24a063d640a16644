"""A conversation with a model: history kept within the context, streamed replies.

Each turn renders the whole conversation with the chat template
(`<|endoftext|>[<|system|>S<|end|>]<|user|>U<|end|><|assistant|>A<|end|>...<|user|>U<|end|><|assistant|>`),
streams the answer until <|end|> (or <|endoftext|>), and keeps it in the history.

Fitting the context (block_size). The prompt is trimmed to leave `reserve = min(max_new_tokens,
block_size // 2)` tokens for the answer: the oldest exchanges are dropped first (the system prompt
stays), and a single message too long on its own keeps its last tokens inside an intact template
(system prompt, <|user|>, <|end|><|assistant|>). So any max_new_tokens works on any model: an answer
longer than the reserve goes on past the context with the generator's sliding window. User text is
always ordinary text: typing "<|assistant|>" cannot open a turn. Used by `python -m fgpt_jax.chat`.
"""

from __future__ import annotations

from collections.abc import Iterator

from fgpt_jax.inference.generator import Generator, TextStreamer
from fgpt_jax.tokenizer import Tokenizer, get_tokenizer


class ChatSession:
    """A conversation with a model: history, context trimming, streamed replies."""

    def __init__(
        self,
        generator: Generator,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_k: int = 50,
        top_p: float = 0.95,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens}: expected an integer >= 1")
        self.gen, self.tok = generator, tokenizer or get_tokenizer()
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.reserve = min(max_new_tokens, max(1, generator.config.block_size // 2))  # context kept for the answer
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed, self.turn = seed, 0
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def context_ids(self) -> list[int]:
        """The rendered conversation ending in an open <|assistant|>, at most block_size - reserve
        tokens when it can be (only a system prompt longer than that cannot)."""
        budget = self.gen.config.block_size - self.reserve
        while True:
            ids, _ = self.tok.render_chat(self._messages(), add_generation_prompt=True)
            if len(ids) <= budget:
                return ids
            if len(self.history) <= 1:
                return self._cut_last_message(ids, budget)
            # Drop the oldest exchange (a user turn and the assistant's answer to it).
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]

    def _cut_last_message(self, ids: list[int], budget: int) -> list[int]:
        """The one message left is too long: keep its last tokens between the template's own."""
        if not self.history:
            return ids  # a system prompt alone over budget: the generator keeps the last tokens
        last = self.history[-1]
        skeleton, _ = self.tok.render_chat(
            self._messages()[:-1] + [{**last, "content": ""}], add_generation_prompt=True
        )
        room = budget - len(skeleton)
        if room < 1:
            return ids
        head, tail = skeleton[:-2], skeleton[-2:]  # tail: the message's <|end|> and the open <|assistant|>
        return head + self.tok.encode(last["content"])[-room:] + tail

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the answer to `user_text` as text pieces; the full answer joins the history."""
        self.history.append({"role": "user", "content": user_text})
        ids = self.context_ids()
        answer: list[int] = []
        out = TextStreamer()
        for t in self.gen.stream(ids, self.max_new_tokens, seed=self.seed + self.turn, **self.sampling):
            if t in self.gen.stop_ids:
                break
            answer.append(t)
            piece = out.push(t)
            if piece:
                yield piece
        tail = out.flush()
        if tail:
            yield tail
        self.turn += 1
        self.history.append({"role": "assistant", "content": self.tok.decode(answer)})
