"""Hugging Face tokenizer files for our GPT-2 BPE, derived from the ranks file shipped in the package.

transformers' GPT2Tokenizer reads OpenAI's `encoder.json` (as vocab.json) and `vocab.bpe` (as
merges.txt). Both are recoverable from tiktoken's ranks file, so we derive them instead of
shipping 1.5 MB more:

- vocab.json: token bytes -> rank, with each byte written through GPT-2's `bytes_to_unicode` map
  (printable bytes stand for themselves, the others are shifted to U+0100..), then
  `<|endoftext|>` = 50256. Serialised as `json.dumps` with its defaults, as OpenAI did.
- merges.txt: the merge that creates the token of rank r is found by running BPE on its bytes
  with the merges of rank < r only: what is left is exactly two parts, the pair that rank r joins.

The result is byte-for-byte OpenAI's files (sha256 pinned below; tiktoken pins the same hashes).
"""

from __future__ import annotations

import functools
import hashlib
import json

from tiktoken.load import load_tiktoken_bpe

from fgpt_jax.tokenizer import EOT, RANKS_FILE, SPECIAL_TOKENS, _check_ranks_file

# tiktoken_ext.openai_public.gpt2() checks OpenAI's files against these.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# The chat template of docs/design.md (Phi-3 style), so `apply_chat_template` renders what `render_chat` does.
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 src/encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """BPE of `token` using only merges of rank < max_rank (lowest rank merged first)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


@functools.cache
def gpt2_bpe_files(ranks_file: str = RANKS_FILE) -> tuple[str, str]:
    """(encoder.json text, vocab.bpe text), byte-identical to OpenAI's GPT-2 files."""
    _check_ranks_file(ranks_file)
    ranks = load_tiktoken_bpe(ranks_file)
    byte_map = bytes_to_unicode()
    to_str = lambda b: "".join(byte_map[x] for x in b)  # noqa: E731
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    encoder = {to_str(tok): rank for tok, rank in by_rank}
    encoder[EOT] = SPECIAL_TOKENS[EOT]
    merges = ["#version: 0.2"]
    for tok, rank in by_rank:
        if len(tok) < 2:
            continue
        parts = _bpe_parts(tok, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"{ranks_file}: token of rank {rank} ({tok!r}) is not one merge of lower-ranked tokens")
        merges.append(f"{to_str(parts[0])} {to_str(parts[1])}")
    return json.dumps(encoder), "\n".join(merges) + "\n"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_files(n_vocab: int, model_max_length: int) -> dict[str, str]:
    """{file name: text} of an AutoTokenizer-loadable GPT-2 tokenizer for a model with `n_vocab` rows.

    The chat tokens (<|user|>=50257 .. <|end|>=50260) are added tokens only when the model has rows
    for them: a plain 50257-row GPT-2 gets exactly OpenAI's tokenizer, because transformers parses
    special tokens out of text and an id past the embedding table would crash the model.
    `model_max_length` is the context length (n_positions).
    """
    encoder_json, merges_txt = gpt2_bpe_files()
    specials = {tok: i for tok, i in SPECIAL_TOKENS.items() if i < n_vocab}
    extra = [tok for tok in specials if tok != EOT]
    added = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
        }
        for tok, i in specials.items()
    }
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "errors": "replace",
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
    }
    special_map = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    if extra:
        # transformers 4.x reads additional_special_tokens, 5.x extra_special_tokens: write both.
        config["additional_special_tokens"] = extra
        config["extra_special_tokens"] = extra
        config["chat_template"] = CHAT_TEMPLATE
        special_map["additional_special_tokens"] = extra
    files = {
        "vocab.json": encoder_json,
        "merges.txt": merges_txt,
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n",
    }
    if extra:
        files["added_tokens.json"] = json.dumps({tok: specials[tok] for tok in extra}, indent=2) + "\n"
    return files
