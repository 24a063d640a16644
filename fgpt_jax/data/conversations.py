"""Instruction-tuning data: conversations -> rendered, filtered, split, packed rows.

Sources. `load_conversations` reads Alpaca records (`instruction`, `input`, `output`: Raschka's
instruction JSON, yahma/alpaca-cleaned) and chat records (`messages`: a list of {role, content}
with roles system/user/assistant, HuggingFaceTB/smol-smoltalk's schema) from local .json (an
array, or JSON lines) / .jsonl / .parquet files, or from the Hub through `datasets`. The schema is
detected per record. An Alpaca record becomes one user turn (the instruction, plus a blank line and
the input when there is one) and one assistant turn (the output). Local JSON is parsed with the
standard library rather than `datasets`' json builder: pyarrow's schema inference turns one bad
record into an opaque cast error, while we must name the file and record index.

Rendering and filters. Every conversation goes through `Tokenizer.render_chat` (the one template,
docs/design.md). Its tokens split in two disjoint sets that add up to the rendered length:
  response tokens = the supervised ones (loss mask 1): assistant content and each turn's <|end|>;
  prompt tokens   = all the others: the leading <|endoftext|>, every role token (<|assistant|>
                    included), system and user content and their <|end|>.
A conversation is dropped, and counted under the first rule that drops it, when its prompt
exceeds `max_prompt_tokens`, its response exceeds `max_response_tokens` (0 = no limit), or its
rendering exceeds seq_len + 1 tokens (it cannot fit a row; conversations are never cut).

Split. A conversation is in validation iff a sha256 of its rendered ids, read as a number in
[0, 1), is below `val_fraction`: identical conversations always land in the same split, and the
split does not depend on the seed or on the order of the records.

Layout. Rows are `tokens` int32 [N, T + 1] and `mask` float32 [N, T], the mask aligned with the
targets tokens[:, 1:] (render_chat's loss mask shifted by one). Packing (the default) places whole
conversations in the row with the least room that still fits them (greedy best-fit, in the seeded
shuffled order); each conversation starts with its own <|endoftext|>, the rest of a row is
<|endoftext|> padding with mask 0. Padding (`pack=False`) puts one conversation per row. Measured on
Raschka's 1,100 records with the tiny model, T = 128, batch 16 on 2 CPU cores (benchmarks/RESULTS.md,
"SFT data: packing vs padding"): packing fills 95% of each row instead of 23%, needs 4.1x fewer
rows and ran an epoch 3.3-5.9x faster, so it is the default. It also makes ~4x fewer optimizer
steps per epoch at the same batch size: scale the batch down (or the steps up) to compare.
Packed conversations share a row's causal attention (a later one can attend to an earlier one
across the <|endoftext|> separator), exactly as documents do in pretraining.

Batches. `fgpt_jax.data.loader.RowLoader` reads the rows (a fresh permutation each epoch, batch k a
pure function of (seed, k), a checkpointable state) and `val_rows` the fixed validation batches.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from dataclasses import dataclass, field

import numpy as np

from fgpt_jax.data import derive, in_val_split
from fgpt_jax.data.loader import Rows
from fgpt_jax.data.sources import DataError
from fgpt_jax.tokenizer import get_tokenizer

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
ROLES = ("system", "user", "assistant")


# -- loading -------------------------------------------------------------------------------------
def _conversation(rec, where: str, i: int) -> list[dict]:
    """One record of either schema as a list of {"role", "content"} messages."""

    def bad(why: str):
        return DataError(f"{where}: record {i}: {why}")

    if not isinstance(rec, dict):
        raise bad(f"expected an object, got {type(rec).__name__}")
    # Columnar sources (parquet, the Hub) fill a column a record lacks with None: treat it as absent.
    rec = {k: v for k, v in rec.items() if v is not None}
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, (list, tuple)) or not msgs:
            raise bad("'messages' must be a non-empty list of {role, content}")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise bad(f"message {j} must be {{role: {'/'.join(ROLES)}, content: string}}, got {m!r:.80}")
            if m["role"] == "system" and j:
                raise bad(f"message {j}: a system message may only come first")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    if "instruction" in rec and "output" in rec:
        inst, inp, outp = rec["instruction"], rec.get("input") or "", rec["output"]
        for k, v in (("instruction", inst), ("input", inp), ("output", outp)):
            if not isinstance(v, str):
                raise bad(f"'{k}' must be a string, got {type(v).__name__}")
        return [
            {"role": "user", "content": inst + ("\n\n" + inp if inp else "")},
            {"role": "assistant", "content": outp},
        ]
    raise bad(
        f"unknown schema (keys: {', '.join(sorted(map(str, rec))) or 'none'}); expected Alpaca "
        f"'instruction'/'input'/'output' or 'messages'"
    )


def _read_file(path: str) -> list:
    """The records of one local file, in order."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # comes with `datasets`

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: could not read as parquet: {str(e).splitlines()[0] if str(e) else e!r}") from e
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte order mark (Windows editors write one) is not JSON
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8)"
        ) from None
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON array ({e.msg} at line {e.lineno})") from e
    records = []  # JSON lines (.jsonl, or a .json that is not an array, as `datasets` accepts)
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} (record {len(records)}): invalid JSON ({e.msg})") from e
    return records


def read_records(path: str, limit: int | None = None) -> list[tuple[dict, str, int]]:
    """(record, where, index) of every record of a local .json/.jsonl/.parquet file or directory of
    them, or of a Hub dataset; `where` and `index` name the record in error messages.

    Anything that is not an existing path is a Hub dataset `NAME[:SPLIT]`, loaded with
    `datasets.load_dataset(NAME, split=SPLIT or "train")`; offline that fails with one line that
    suggests a local file. `limit` keeps the first `limit` records. The loader of instruction data
    and the loader of preference pairs both read through here, so both refuse in one line naming the
    file a file that is not UTF-8 and a source without a single record (an empty file, `[]`)."""
    out: list[tuple[dict, str, int]] = []
    if os.path.exists(path):
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(LOCAL_SUFFIXES))
            if not files:
                raise DataError(f"{path}: directory holds no {'/'.join(LOCAL_SUFFIXES)} files")
        elif path.lower().endswith(LOCAL_SUFFIXES):
            files = [path]
        else:
            raise DataError(f"{path}: expected a {'/'.join(LOCAL_SUFFIXES)} file")
        for f in files:
            records = _read_file(f)
            if not isinstance(records, list):
                raise DataError(f"{f}: expected a JSON array of records, got {type(records).__name__}")
            for i, rec in enumerate(records):
                if limit is not None and len(out) >= limit:
                    return out
                out.append((rec, f, i))
        if not out:
            where = "this file" if len(files) == 1 else f"its {len(files)} files"
            raise DataError(f"{path}: no records in {where} (empty, or an empty JSON array)")
        return out
    if path.lower().endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: file not found")
    import datasets  # slow to import; only the Hub path needs it

    name, _, split = path.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown name or split: the user needs one line
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(
            f"{path}: could not load from the Hugging Face Hub ({reason[:300]}); without network, pass a "
            f"local .json/.jsonl/.parquet file with the same schema instead"
        ) from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{path}: no records in this dataset split")
    return [(rec, path, i) for i, rec in enumerate(ds)]


def load_conversations(path: str, limit: int | None = None) -> list[list[dict]]:
    """Conversations from a local file, a directory of them or a Hub dataset (`read_records`)."""
    return [_conversation(rec, where, i) for rec, where, i in read_records(path, limit)]


# -- rendering, filters, split, layout -------------------------------------------------------------
@dataclass
class ChatData:
    """Train and validation rows, and `stats` (a JSON-serialisable dict of what was kept and dropped)."""

    train: Rows
    val: Rows
    stats: dict = field(default_factory=dict)


def render_all(convs: list[list[dict]], num_threads: int = 0) -> list[tuple[list[int], list[int]]]:
    """`render_chat` over every conversation, in order (tiktoken releases the GIL, so threads help)."""
    tok = get_tokenizer()
    threads = num_threads or min(8, os.cpu_count() or 1)
    if threads == 1 or len(convs) < 256:
        return [tok.render_chat(c) for c in convs]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(tok.render_chat, convs, chunksize=64))


def _pack(lengths: list[int], width: int) -> list[list[int]]:
    """Best-fit: each item goes to the open row with the least room that fits it, else a new row.

    Rows are bucketed by free room; a bit set of non-empty buckets finds the best row in O(1)."""
    rows: list[list[int]] = []
    buckets: dict[int, list[int]] = {}
    nonempty = 0  # bit c set iff some row has exactly c free tokens (c > 0)
    for i, n in enumerate(lengths):
        above = nonempty >> n
        if above:
            room = n + (above & -above).bit_length() - 1
            r = buckets[room].pop()
            if not buckets[room]:
                nonempty &= ~(1 << room)
        else:
            r, room = len(rows), width
            rows.append([])
        rows[r].append(i)
        left = room - n
        if left:
            buckets.setdefault(left, []).append(r)
            nonempty |= 1 << left
    return rows


def _layout(rendered: list[tuple[list[int], list[int]]], seq_len: int, pack: bool, eot_id: int) -> Rows:
    width = seq_len + 1
    groups = _pack([len(ids) for ids, _ in rendered], width) if pack else [[i] for i in range(len(rendered))]
    tokens = np.full((len(groups), width), eot_id, np.int32)
    loss = np.zeros((len(groups), width), np.float32)  # render_chat's mask, per token
    for r, group in enumerate(groups):
        t = 0
        for i in group:
            ids, m = rendered[i]
            tokens[r, t : t + len(ids)], loss[r, t : t + len(ids)] = ids, m
            t += len(ids)
    # Aligned with the targets: mask[:, t] says whether tokens[:, t + 1] is supervised. Dropping
    # loss[:, 0] loses nothing: every row starts with a conversation's <|endoftext|> (mask 0).
    return Rows(tokens=tokens, mask=np.ascontiguousarray(loss[:, 1:]), num_records=len(rendered))


def build_chat_data(
    convs: list[list[dict]],
    seq_len: int,
    *,
    max_prompt_tokens: int = 0,
    max_response_tokens: int = 0,
    pack: bool = True,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> ChatData:
    """Render, filter, split, shuffle (train, from `seed`) and lay out conversations into rows.

    `pack=True` (the default: 3.3-5.9x faster per epoch than padding in scripts/bench_sft_data.py)
    packs whole conversations per row; False pads one per row. See the module docstring for the exact
    prompt/response token counts the filters use."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_prompt_tokens < 0 or max_response_tokens < 0:
        raise ValueError("max_prompt_tokens and max_response_tokens must be >= 0 (0 = no limit)")
    tok = get_tokenizer()
    stats = {"loaded": len(convs), "kept": 0, "dropped_prompt": 0, "dropped_response": 0, "dropped_too_long": 0}
    splits: dict[str, list] = {"train": [], "val": []}
    for ids, m in render_all(convs):
        response = sum(m)
        if max_prompt_tokens and len(ids) - response > max_prompt_tokens:
            stats["dropped_prompt"] += 1
        elif max_response_tokens and response > max_response_tokens:
            stats["dropped_response"] += 1
        elif len(ids) > seq_len + 1:
            stats["dropped_too_long"] += 1
        else:
            stats["kept"] += 1
            splits["val" if in_val_split(np.asarray(ids, np.int32).tobytes(), val_fraction) else "train"].append(
                (ids, m)
            )
    train = splits["train"]
    order = np.random.default_rng([derive(seed, "chat-shuffle")]).permutation(len(train))
    data = ChatData(
        train=_layout([train[i] for i in order], seq_len, pack, tok.eot_id),
        val=_layout(splits["val"], seq_len, pack, tok.eot_id),
    )
    for name in ("train", "val"):
        s = getattr(data, name)
        used = sum(len(ids) for ids, _ in splits[name])
        stats |= {
            f"{name}_conversations": s.num_records,
            f"{name}_rows": s.num_rows,
            f"{name}_supervised_tokens": int(s.mask.sum()),
            f"{name}_fill_fraction": round(used / max(1, s.num_rows * (seq_len + 1)), 4),
        }
    stats |= {
        "seq_len": seq_len,
        "pack": pack,
        "max_prompt_tokens": max_prompt_tokens,
        "max_response_tokens": max_response_tokens,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    data.stats = stats
    return data
