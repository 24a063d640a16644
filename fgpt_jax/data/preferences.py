"""Preference data (DPO): records -> (prompt, chosen, rejected) pairs -> rendered, filtered, split row pairs.

Layouts, detected per record, from local .json (an array, or JSON lines) / .jsonl / .parquet files or
from the Hub through `datasets` (`NAME` or `NAME:SPLIT`, default split "train"):
  ShareGPT   `conversations`: [{from: system|human|gpt, value}], ending with a human turn; `chosen`
             and `rejected`: one {from: gpt, value} reply each (LLaMA-Factory's dpo_en_demo.json);
  messages   `chosen`/`rejected`: message lists [{role, content}] ending with the assistant's reply,
             after the same conversation, and an optional `prompt` (a string, or a message list the
             replies follow) (HuggingFaceH4/ultrafeedback_binarized, TRL's conversational layout);
  strings    `prompt` a string (one user turn), `chosen`/`rejected` the reply strings;
  transcripts `chosen`/`rejected` strings "\\n\\nHuman: ...\\n\\nAssistant: ..." and no `prompt`: the
             last Assistant turn is the reply, the turns before it the prompt (Anthropic/hh-rlhf).

Bad records. A record the layout cannot describe (a missing `chosen` or `rejected`, an unknown role,
a prompt that does not end with a user turn, chosen and rejected after different conversations) is
an error naming the file and record (`DataError`, one line). Two faults real datasets carry are
counted and skipped instead: an empty (whitespace-only) reply (`dropped_empty`), and chosen equal to
rejected (`dropped_identical`: no preference to learn, and a pair that could never be ranked right).

Rendering and filters. A pair renders as two rows with the chat template (tokenizer.render_chat):
prompt = the conversation and an open <|assistant|>, reply = the reply's tokens and its closing
<|end|>. The mask covers the reply only (earlier assistant turns of the prompt are context), so a
row's masked log-probability is log pi(reply | prompt). A pair is dropped, under the first rule that
drops it, when its prompt has more than `max_prompt_tokens` tokens, either reply more than
`max_response_tokens` (0 = no limit), or either row more than seq_len + 1. With `truncate`, the first
two cut instead of dropping: a long prompt loses its oldest turns (the system prompt stays), then
the start of its last user message, inside an intact template; a long reply keeps its first
`max_response_tokens` tokens (without <|end|>: the cut reply did not end there). A pair whose system
prompt alone is over the limit is still dropped. `truncated_prompt`/`truncated_response` count them.

Split. A pair is in validation iff the sha256 of its content (prompt messages and both replies, as
JSON) read as a number in [0, 1) is below `val_fraction`: stable across runs, machines, seeds,
record order, context lengths and limits.

Layout. `Rows` with 2P rows: row 2i is pair i's chosen reply, row 2i + 1 its rejected one, each
alone in its row, padded with <|endoftext|> (mask 0). `PairLoader` reads train pairs (a fresh
permutation of pairs each epoch, so a pair is never split; batch k a pure function of (seed, k); a
checkpointable state), `val_pairs` the fixed validation batches; both carry each row's reference
log-probability (`PreferenceBatch.ref_logp`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

from fgpt_jax.data import PreferenceBatch, in_val_split
from fgpt_jax.data.conversations import read_records
from fgpt_jax.data.loader import STATE_VERSION, BatchLoader, EpochPermutation, Rows
from fgpt_jax.data.sources import DataError
from fgpt_jax.tokenizer import get_tokenizer

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES = ("system", "user", "assistant")
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class Pair:
    """One preference: the conversation so far (ending with a user turn) and two replies to it."""

    prompt: tuple[tuple[str, str], ...]  # (role, content) messages
    chosen: str
    rejected: str

    def messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.prompt]

    def key(self) -> str:
        """The split key: the pair's content, independent of rendering and limits."""
        return json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False)


# -- loading -------------------------------------------------------------------------------------
def _turns(msgs, what: str, bad, role_key: str, text_key: str, roles: dict, noun: str) -> list[tuple[str, str]]:
    """[(role, text)] of a list of {role_key, text_key} dicts; `roles` maps the record's role names to ours."""
    if not isinstance(msgs, (list, tuple)):
        raise bad(f"'{what}' must be a list of {{{role_key}, {text_key}}} {noun}s, got {type(msgs).__name__}")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get(role_key) not in roles or not isinstance(m.get(text_key), str):
            raise bad(f"{what} {noun} {j} must be {{{role_key}: {'/'.join(roles)}, {text_key}: string}}, got {m!r:.80}")
        out.append((roles[m[role_key]], m[text_key]))
    return out


def _sharegpt(msgs, what: str, bad) -> list[tuple[str, str]]:
    return _turns(msgs, what, bad, "from", "value", SHAREGPT_ROLES, "turn")


def _messages(msgs, what: str, bad) -> list[tuple[str, str]]:
    return _turns(msgs, what, bad, "role", "content", {r: r for r in ROLES}, "message")


def _transcript(text: str, what: str, bad) -> list[tuple[str, str]]:
    """An Anthropic/hh-rlhf transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as messages."""
    parts = _TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if parts[0].strip() or len(parts) < 3:
        raise bad(
            f"'{what}' is a string but not a transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...'); "
            f"give a 'prompt' for reply strings"
        )
    return [
        ("user" if role == "Human" else "assistant", content.strip()) for role, content in zip(parts[1::2], parts[2::2])
    ]


def _reply(value, what: str, bad) -> str:
    """A ShareGPT reply: {from: gpt, value} or a plain string."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, dict)
        and SHAREGPT_ROLES.get(value.get("from")) == "assistant"
        and isinstance(value.get("value"), str)
    ):
        return value["value"]
    raise bad(f"'{what}' must be {{from: gpt, value: string}} or a string, got {value!r:.80}")


def _check_prompt(prompt: list[tuple[str, str]], bad) -> None:
    if not prompt:
        raise bad("empty conversation: expected turns ending with a user turn")
    for j, (role, _) in enumerate(prompt):
        if role == "system" and j:
            raise bad(f"turn {j}: a system message may only come first")
    if prompt[-1][0] != "user":
        raise bad(
            f"the conversation must end with a user turn (the one both replies answer), "
            f"it ends with a {prompt[-1][0]} turn"
        )


def to_pair(rec, where: str, i: int) -> Pair:
    """One record of any layout above as a Pair; DataError naming `where` and record `i` otherwise."""

    def bad(why: str):
        return DataError(f"{where}: record {i}: {why}")

    if not isinstance(rec, dict):
        raise bad(f"expected an object, got {type(rec).__name__}")
    rec = {k: v for k, v in rec.items() if v is not None}  # columnar sources fill absent columns with None
    if "conversations" not in rec and "chosen" not in rec and "rejected" not in rec:
        raise bad(
            f"unknown layout (keys: {', '.join(sorted(map(str, rec))) or 'none'}); expected 'chosen' and "
            f"'rejected' replies, after 'conversations' (ShareGPT) or a 'prompt'"
        )
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise bad(f"missing '{k}'")
    if "conversations" in rec:
        prompt = _sharegpt(rec["conversations"], "conversations", bad)
        chosen, rejected = (_reply(rec[k], k, bad) for k in ("chosen", "rejected"))
    else:
        sides = []
        for k in ("chosen", "rejected"):
            v = rec[k]
            if isinstance(v, str) and "prompt" in rec:
                sides.append([("assistant", v)])
            elif isinstance(v, str):
                sides.append(_transcript(v, k, bad))
            else:
                sides.append(_messages(v, k, bad))
            if not sides[-1] or sides[-1][-1][0] != "assistant":
                raise bad(f"'{k}' must end with the assistant's reply")
        (ctx, chosen), (r_ctx, rejected) = ((s[:-1], s[-1][1]) for s in sides)
        if ctx != r_ctx:
            raise bad("'chosen' and 'rejected' follow different conversations")
        prompt = ctx
        if "prompt" in rec:  # a string is the last user turn; a message list the whole conversation
            p = rec["prompt"]
            given = [("user", p)] if isinstance(p, str) else _messages(p, "prompt", bad)
            if ctx and (ctx[-1:] if isinstance(p, str) else ctx) != given:
                raise bad("'chosen' and 'rejected' follow another conversation than 'prompt'")
            prompt = ctx or given
    _check_prompt(prompt, bad)
    return Pair(tuple(prompt), chosen, rejected)


def load_pairs(path: str, limit: int | None = None) -> list[Pair]:
    """Pairs from a local .json/.jsonl/.parquet file, a directory of them or a Hub dataset
    `NAME[:SPLIT]` (fgpt_jax.data.conversations.read_records); `limit` keeps the first records."""
    return [to_pair(rec, where, i) for rec, where, i in read_records(path, limit)]


# -- rendering, filters, split, layout -------------------------------------------------------------
@dataclass
class PreferenceData:
    """Train and validation row pairs (`Rows`, 2 rows per pair) and what was kept, cut and dropped."""

    train: Rows
    val: Rows
    stats: dict = field(default_factory=dict)


def _fit_prompt(msgs: list[dict], budget: int) -> list[int] | None:
    """The prompt's ids cut to `budget` tokens inside an intact template (oldest turns first, then the
    start of the last user message), or None when the system prompt alone does not leave room."""
    tok = get_tokenizer()
    system, rest = (msgs[:1], msgs[1:]) if msgs[0]["role"] == "system" else ([], msgs)
    while len(rest) > 1:
        rest = rest[1:]
        while rest[0]["role"] != "user":  # start at a user turn
            rest = rest[1:]
        ids, _ = tok.render_chat(system + rest, add_generation_prompt=True)
        if len(ids) <= budget:
            return ids
    skeleton, _ = tok.render_chat(system + [{"role": "user", "content": ""}], add_generation_prompt=True)
    room = budget - len(skeleton)
    if room < 1:
        return None
    # skeleton ends with the user message's <|end|> and the open <|assistant|>
    return skeleton[:-2] + tok.encode(rest[-1]["content"])[-room:] + skeleton[-2:]


def _layout(items: list[tuple[list[int], list[int], list[int]]], seq_len: int, eot_id: int) -> Rows:
    width = seq_len + 1
    tokens = np.full((2 * len(items), width), eot_id, np.int32)
    loss = np.zeros((2 * len(items), width), np.float32)
    for i, (prompt, chosen, rejected) in enumerate(items):
        for r, reply in ((2 * i, chosen), (2 * i + 1, rejected)):
            tokens[r, : len(prompt) + len(reply)] = prompt + reply
            loss[r, len(prompt) : len(prompt) + len(reply)] = 1
    # Aligned with the targets (mask[:, t] is about tokens[:, t + 1]); loss[:, 0] is the prompt's <|endoftext|>.
    return Rows(tokens=tokens, mask=np.ascontiguousarray(loss[:, 1:]), num_records=len(items))


def build_preference_data(
    pairs: list[Pair],
    seq_len: int,
    *,
    max_prompt_tokens: int = 0,
    max_response_tokens: int = 0,
    truncate: bool = False,
    val_fraction: float = 0.05,
) -> PreferenceData:
    """Render, filter (or cut), split and lay out pairs as rows; see the module docstring for the rules."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_prompt_tokens < 0 or max_response_tokens < 0:
        raise ValueError("max_prompt_tokens and max_response_tokens must be >= 0 (0 = no limit)")
    tok = get_tokenizer()
    stats = {
        k: 0
        for k in (
            "loaded",
            "kept",
            "dropped_empty",
            "dropped_identical",
            "dropped_prompt",
            "dropped_response",
            "dropped_too_long",
            "truncated_prompt",
            "truncated_response",
        )
    }
    stats["loaded"] = len(pairs)
    splits: dict[str, list] = {"train": [], "val": []}
    for pair in pairs:
        if not pair.chosen.strip() or not pair.rejected.strip():
            stats["dropped_empty"] += 1
            continue
        if pair.chosen == pair.rejected:
            stats["dropped_identical"] += 1
            continue
        prompt, _ = tok.render_chat(pair.messages(), add_generation_prompt=True)
        if max_prompt_tokens and len(prompt) > max_prompt_tokens:
            prompt = _fit_prompt(pair.messages(), max_prompt_tokens) if truncate else None
            if prompt is None:
                stats["dropped_prompt"] += 1
                continue
            stats["truncated_prompt"] += 1
        replies = [tok.encode(r) + [tok.end_id] for r in (pair.chosen, pair.rejected)]
        if max_response_tokens and max(map(len, replies)) > max_response_tokens:
            if not truncate:
                stats["dropped_response"] += 1
                continue
            replies = [r[:max_response_tokens] for r in replies]
            stats["truncated_response"] += 1
        if len(prompt) + max(map(len, replies)) > seq_len + 1:
            stats["dropped_too_long"] += 1
            continue
        stats["kept"] += 1
        splits["val" if in_val_split(pair.key(), val_fraction) else "train"].append((prompt, *replies))
    data = PreferenceData(
        train=_layout(splits["train"], seq_len, tok.eot_id), val=_layout(splits["val"], seq_len, tok.eot_id)
    )
    for name in ("train", "val"):
        rows = getattr(data, name)
        stats |= {f"{name}_pairs": rows.num_records, f"{name}_reply_tokens": int(rows.mask.sum())}
    stats |= {
        "seq_len": seq_len,
        "max_prompt_tokens": max_prompt_tokens,
        "max_response_tokens": max_response_tokens,
        "truncate": truncate,
        "val_fraction": val_fraction,
    }
    data.stats = stats
    return data


# -- batches ---------------------------------------------------------------------------------------
def _check(rows: Rows, ref_logp: np.ndarray, kind: str) -> np.ndarray:
    ref_logp = np.asarray(ref_logp, np.float32)
    if rows.num_rows % 2 or ref_logp.shape != (rows.num_rows,):
        raise DataError(
            f"{kind}: {rows.num_rows} rows (pairs of 2) and reference log-probs of shape "
            f"{ref_logp.shape}: expected one per row"
        )
    return ref_logp


def reference_hash(ref_logp: np.ndarray) -> str:
    """sha256 of reference log-probs as float32: the loader state records it (a different reference
    is different data), and a resumed DPO run checks its reference file against it."""
    return hashlib.sha256(np.ascontiguousarray(ref_logp, np.float32).tobytes()).hexdigest()[:16]


class PairLoader(BatchLoader):
    """Train pairs in a fresh permutation each epoch: `PreferenceBatch` of 2 x local_batch rows.

    `global_batch_size` counts pairs; pair g of the stream is pair perm_e[g mod P] of epoch
    e = g // P, and its two rows stay adjacent (chosen, rejected).

    `reference_source` ({"init_from", "step"}: the model the log-probs come from), when given, is
    recorded in the state, so a resumed run knows which checkpoint to score its reference with again."""

    kind = "preference data"

    def __init__(
        self,
        rows: Rows,
        ref_logp: np.ndarray,
        global_batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        first_row: int = 0,
        reference_source: dict | None = None,
    ):
        self.ref_logp = _check(rows, ref_logp, self.kind)
        self.reference_source = dict(reference_source) if reference_source else None
        if rows.num_rows < 2:
            raise DataError(f"{self.kind}: no pairs (every record filtered out?)")
        self.rows, self.seed = rows, int(seed)
        self.num_pairs = rows.num_rows // 2
        self.ref_hash = reference_hash(self.ref_logp)
        self.permutation = EpochPermutation(self.num_pairs, self.seed, "preference-pairs")
        super().__init__(global_batch_size, process_index, process_count, prefetch, first_row=first_row)

    def batch(self, step: int) -> PreferenceBatch:
        _, p = self.permutation(self.local_rows(step))
        r = np.stack([2 * p, 2 * p + 1], axis=-1).reshape(-1)
        return PreferenceBatch(self.rows.tokens[r], self.rows.mask[r], self.ref_logp[r])

    def _identity(self) -> dict:
        # The reference's hash too: batches carry its log-probs, so a different reference is different data.
        return {
            "version": STATE_VERSION,
            "kind": "preference",
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_pairs": self.num_pairs,
            "content_hash": self.rows.content_hash,
            "reference_hash": self.ref_hash,
            **({"reference_model": self.reference_source} if self.reference_source else {}),
        }

    def set_state(self, state: dict) -> None:
        if self.reference_source and "reference_model" not in state:  # saved by fgpt-jax <= 0.2.0
            state = {**state, "reference_model": self.reference_source}
        super().set_state(state)


def val_pairs(
    rows: Rows, ref_logp: np.ndarray, batch_pairs: int, pad_id: int, process_index: int = 0, process_count: int = 1
) -> list[PreferenceBatch]:
    """Every pair in order, in batches of `batch_pairs` (global; a process gets its pairs of each).

    The last batch is filled up with <|endoftext|> pairs whose mask is all 0: the same shape for
    every batch, and padding pairs count for nothing in the DPO sums."""
    ref_logp = _check(rows, ref_logp, "preference data")
    if batch_pairs < 1 or batch_pairs % process_count:
        raise ValueError(f"batch_pairs {batch_pairs} must be positive and divisible by process_count {process_count}")
    n_pad = 2 * (-(rows.num_rows // 2) % batch_pairs)
    tokens = np.concatenate([rows.tokens, np.full((n_pad, rows.seq_len + 1), pad_id, np.int32)])
    mask = np.concatenate([rows.mask, np.zeros((n_pad, rows.seq_len), np.float32)]).astype(np.float32)
    ref = np.concatenate([ref_logp, np.zeros(n_pad, np.float32)])
    size, local = 2 * batch_pairs, 2 * batch_pairs // process_count
    lo = process_index * local
    return [
        PreferenceBatch(tokens[b + lo : b + lo + local], mask[b + lo : b + lo + local], ref[b + lo : b + lo + local])
        for b in range(0, len(tokens), size)
    ]
