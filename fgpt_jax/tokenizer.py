"""GPT-2 BPE (tiktoken) with FGPT's chat tokens, loaded from a ranks file shipped in the package.

Why shipped: tiktoken downloads its ranks on first use, which fails on air-gapped GPU nodes. The
file is the public r50k/GPT-2 ranks file; its sha256 is checked on load so a corrupted or foreign
file fails loudly instead of silently producing different token ids.

Special tokens (ids fixed; FGPT's <|user|>/<|assistant|> ids kept):
  <|endoftext|>=50256 (document separator, as in GPT-2), <|user|>=50257, <|assistant|>=50258,
  <|system|>=50259, <|end|>=50260. The model's vocabulary is padded to 50304 (a multiple of 64).

`encode` never parses special tokens out of text: a user typing "<|assistant|>" gets ordinary
tokens, so text can never open a turn. Special ids only enter through `render_chat` or explicit ids.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from fgpt_jax.errors import UserError

RANKS_FILE = os.path.join(os.path.dirname(__file__), "assets", "r50k_base.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation regex (tiktoken_ext.openai_public.r50k_pat_str).
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

EOT, USER, ASSISTANT, SYSTEM, END = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
SPECIAL_TOKENS = {EOT: 50256, USER: 50257, ASSISTANT: 50258, SYSTEM: 50259, END: 50260}
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
N_VOCAB = 50261  # ids the tokenizer can produce; the model pads to GPTConfig.vocab_size (50304)
TOKENIZER_NAME = "gpt2-fgpt-chat"


@dataclass(frozen=True)
class Message:
    """One chat turn; `role` is "system", "user" or "assistant"."""

    role: str
    content: str


def _check_ranks_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GPT-2 ranks file missing; reinstall fgpt-jax (it ships in fgpt_jax/assets)")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != RANKS_SHA256:
        raise UserError(f"{path}: sha256 {digest} is not the GPT-2 ranks file ({RANKS_SHA256}); reinstall fgpt-jax")


class Tokenizer:
    """GPT-2 BPE plus chat tokens. Thread-safe; batch calls use tiktoken's native thread pool."""

    name = TOKENIZER_NAME
    sha256 = RANKS_SHA256  # recorded in shard manifests so foreign shards are refused

    def __init__(self, ranks_file: str = RANKS_FILE):
        _check_ranks_file(ranks_file)
        self._enc = tiktoken.Encoding(
            name=TOKENIZER_NAME,
            pat_str=R50K_PATTERN,
            mergeable_ranks=load_tiktoken_bpe(ranks_file),
            special_tokens=SPECIAL_TOKENS,
            explicit_n_vocab=N_VOCAB,
        )
        self.eot_id = SPECIAL_TOKENS[EOT]
        self.user_id = SPECIAL_TOKENS[USER]
        self.assistant_id = SPECIAL_TOKENS[ASSISTANT]
        self.system_id = SPECIAL_TOKENS[SYSTEM]
        self.end_id = SPECIAL_TOKENS[END]
        self.special_ids = dict(SPECIAL_TOKENS)
        self.n_vocab = N_VOCAB
        # Generation stops at either: <|end|> closes an assistant turn, <|endoftext|> a document.
        self.stop_ids = (self.end_id, self.eot_id)

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; special-token strings are encoded as plain text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` over many texts with tiktoken's threaded batch API (releases the GIL)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text. Special tokens decode to their names; padded-vocab ids (>= n_vocab),
        which only an untrained model samples, decode to nothing."""
        return self._enc.decode([int(i) for i in ids if 0 <= int(i) < self.n_vocab])

    def token_bytes(self, vocab_size: int) -> np.ndarray:
        """int32 [vocab_size]: the UTF-8 length in bytes of every ordinary token, 0 for the special and
        padded-vocabulary ids. Bits per byte divide by these, so they count the text a target token
        stands for and never a special token (as nanochat's `get_token_bytes`)."""
        out = np.zeros(vocab_size, np.int32)
        for i in range(min(self.eot_id, vocab_size)):  # ids below <|endoftext|> are the byte-level BPE ranks
            out[i] = len(self._enc.decode_single_token_bytes(i))
        return out

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes, for streaming: a UTF-8 character may span several tokens."""
        return self._enc.decode_bytes([int(i) for i in ids if 0 <= int(i) < self.n_vocab])

    def render_chat(
        self, messages: Sequence[Message | dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Render a conversation with the Phi-3-style template of docs/design.md.

        `<|endoftext|>[<|system|>S<|end|>]<|user|>U<|end|><|assistant|>A<|end|>...`
        Returns (ids, loss_mask): mask 1 exactly on assistant content tokens and their closing
        <|end|>, 0 elsewhere (role tokens included). `add_generation_prompt` appends an open
        <|assistant|> (mask 0) for the model to complete.
        """
        ids, mask = [self.eot_id], [0]
        for i, m in enumerate(messages):
            role, content = (m.role, m.content) if isinstance(m, Message) else (m.get("role"), m.get("content"))
            if role not in ROLE_TOKENS:
                raise ValueError(f"message {i}: role {role!r} is not one of {sorted(ROLE_TOKENS)}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            if role == "system" and i != 0:
                raise ValueError(f"message {i}: a system message may only come first")
            body = self.encode(content) + [self.end_id]
            ids += [self.special_ids[ROLE_TOKENS[role]]] + body
            mask += [0] + [int(role == "assistant")] * len(body)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The project's one tokenizer (cached: building the BPE ranks takes ~0.3 s)."""
    return Tokenizer()
