"""Preference pairs: every layout to the same pair, one-line errors naming the record, the filters and
their counts, truncation inside the chat template, a stable split, and batches that keep pairs whole."""

import json
from pathlib import Path

import numpy as np
import pytest

from fgpt_jax.data import PreferenceBatch, in_val_split
from fgpt_jax.data.preferences import Pair, PairLoader, build_preference_data, load_pairs, to_pair, val_pairs
from fgpt_jax.data.sources import DataError

DEMO = Path(__file__).parent / "data" / "dpo_en_demo_first120.json"

CONV = [
    ("system", "Be brief."),
    ("user", "Hi"),
    ("assistant", "Hello! How can I help?"),
    ("user", "Capital of France?"),
]
CHOSEN, REJECTED = "Paris.", "London, I think."
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def msgs(conv):
    return [{"role": r, "content": c} for r, c in conv]


def transcript(conv, reply):
    return "".join(f"\n\n{'Human' if r == 'user' else 'Assistant'}: {c}" for r, c in conv + [("assistant", reply)])


def write(path, records, jsonl=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records))
    return str(path)


# -- layouts ---------------------------------------------------------------------------------------
def test_real_sharegpt_pairs_load():
    raw = json.loads(DEMO.read_text(encoding="utf-8"))
    pairs = load_pairs(str(DEMO))
    assert len(pairs) == len(raw) == 120
    for p, r in zip(pairs, raw):
        assert p.chosen == r["chosen"]["value"] and p.rejected == r["rejected"]["value"]
        assert [c for _, c in p.prompt] == [t["value"] for t in r["conversations"]]
        assert p.prompt[-1][0] == "user"
    assert any(p.prompt[0][0] == "system" for p in pairs)
    assert any(sum(r == "assistant" for r, _ in p.prompt) >= 2 for p in pairs)  # multi-turn prompts
    assert len(load_pairs(str(DEMO), limit=7)) == 7


def test_every_layout_gives_the_same_pair(tmp_path):
    full = Pair(tuple(CONV), CHOSEN, REJECTED)
    sharegpt = {
        "conversations": [{"from": SHAREGPT_ROLE[r], "value": c} for r, c in CONV],
        "chosen": {"from": "gpt", "value": CHOSEN},
        "rejected": {"from": "gpt", "value": REJECTED},
    }
    # HuggingFaceH4/ultrafeedback_binarized: whole conversations, the prompt string is the last user turn
    ultra = {
        "prompt": CONV[-1][1],
        "prompt_id": "abc",
        "chosen": msgs(CONV + [("assistant", CHOSEN)]),
        "rejected": msgs(CONV + [("assistant", REJECTED)]),
        "messages": msgs(CONV + [("assistant", CHOSEN)]),
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }
    explicit = {
        "prompt": msgs(CONV),
        "chosen": msgs([("assistant", CHOSEN)]),
        "rejected": msgs([("assistant", REJECTED)]),
    }
    implicit = {"chosen": msgs(CONV + [("assistant", CHOSEN)]), "rejected": msgs(CONV + [("assistant", REJECTED)])}
    for rec in (sharegpt, ultra, explicit, implicit):
        assert to_pair(rec, "f", 0) == full
    no_system = CONV[1:]
    hh = {"chosen": transcript(no_system, CHOSEN), "rejected": transcript(no_system, REJECTED)}
    assert to_pair(hh, "f", 0) == Pair(tuple(no_system), CHOSEN, REJECTED)
    strings = {"prompt": "Capital of France?", "chosen": CHOSEN, "rejected": REJECTED}
    assert to_pair(strings, "f", 0) == Pair((("user", "Capital of France?"),), CHOSEN, REJECTED)
    # the same records through files: a JSON array, JSON lines, parquet
    records = [sharegpt, explicit, implicit]
    assert load_pairs(write(tmp_path / "a.json", records)) == [full] * 3
    assert load_pairs(write(tmp_path / "b.jsonl", [hh, strings], jsonl=True))[0].prompt == tuple(no_system)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([implicit, implicit]), tmp_path / "c.parquet")
    assert load_pairs(str(tmp_path / "c.parquet")) == [full] * 2


@pytest.mark.parametrize(
    "rec,message",
    [
        (
            {"conversations": [{"from": "human", "value": "Q"}], "rejected": {"from": "gpt", "value": "A"}},
            "record 1: missing 'chosen'",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                "chosen": {"from": "gpt", "value": "B"},
                "rejected": {"from": "gpt", "value": "C"},
            },
            "record 1: the conversation must end with a user turn (the one both replies answer), "
            "it ends with a assistant",
        ),
        ({"conversations": [], "chosen": "B", "rejected": "C"}, "record 1: empty conversation"),
        (
            {"conversations": [{"from": "observation", "value": "Q"}], "chosen": "B", "rejected": "C"},
            "record 1: conversations turn 0 must be {from: system/human/user/gpt/assistant",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Q"}],
                "chosen": {"from": "human", "value": "B"},
                "rejected": "C",
            },
            "record 1: 'chosen' must be {from: gpt, value: string} or a string",
        ),
        (
            {
                "chosen": msgs([("user", "Q"), ("assistant", "B")]),
                "rejected": msgs([("user", "Other"), ("assistant", "C")]),
            },
            "record 1: 'chosen' and 'rejected' follow different conversations",
        ),
        (
            {
                "prompt": "Q",
                "chosen": msgs([("user", "Other"), ("assistant", "B")]),
                "rejected": msgs([("user", "Other"), ("assistant", "C")]),
            },
            "record 1: 'chosen' and 'rejected' follow another conversation than 'prompt'",
        ),
        (
            {"chosen": msgs([("user", "Q")]), "rejected": msgs([("user", "Q"), ("assistant", "C")])},
            "record 1: 'chosen' must end with the assistant's reply",
        ),
        ({"chosen": "just a reply", "rejected": "another"}, "record 1: 'chosen' is a string but not a transcript"),
        ({"text": "hello"}, "record 1: unknown layout (keys: text)"),
        ([1, 2], "record 1: expected an object, got list"),
    ],
)
def test_bad_records_fail_with_one_line_naming_the_record(tmp_path, rec, message):
    good = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    path = write(tmp_path / "bad.json", [good, rec])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_missing_files_and_offline_hub_are_one_line(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_pairs(str(tmp_path / "nope.json"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"expected a \.json/\.jsonl/\.parquet file"):
        load_pairs(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="could not load from the Hugging Face Hub") as e:
        load_pairs("no-such-user/no-such-preferences:train_prefs")  # HF_*_OFFLINE=1 in the tests
    assert "\n" not in str(e.value) and "local .json/.jsonl/.parquet file" in str(e.value)


def test_a_file_that_is_not_utf8_or_has_no_records_is_named(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"prompt": "Q", "chosen": "caf\xe9", "rejected": "B"}]'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_pairs(str(path))
    assert str(e.value).startswith(f"{path}: line 1: not UTF-8 text ("), e.value
    for content in ("", "[]"):
        (tmp_path / "empty.json").write_text(content)
        with pytest.raises(DataError) as e:
            load_pairs(str(tmp_path / "empty.json"))
        assert str(e.value).startswith(f"{tmp_path / 'empty.json'}: no records in this file"), e.value


# -- rows ------------------------------------------------------------------------------------------
def test_rows_are_the_chat_template_with_only_the_reply_masked(tok):
    pair = next(p for p in load_pairs(str(DEMO)) if sum(r == "assistant" for r, _ in p.prompt) >= 2)
    data = build_preference_data([pair], 4096, val_fraction=0)
    assert data.train.num_rows == 2 and data.stats["train_pairs"] == 1
    for row, reply in ((0, pair.chosen), (1, pair.rejected)):
        ids, chat_mask = tok.render_chat(pair.messages() + [{"role": "assistant", "content": reply}])
        tokens, mask = data.train.tokens[row], data.train.mask[row]
        assert tokens[: len(ids)].tolist() == ids and (tokens[len(ids) :] == tok.eot_id).all()
        n_reply = len(tok.encode(reply)) + 1  # its tokens and the closing <|end|>
        expected = np.zeros(4097, np.float32)
        expected[len(ids) - n_reply : len(ids)] = 1
        np.testing.assert_array_equal(mask, expected[1:])  # aligned with the targets tokens[1:]
        assert sum(chat_mask) > n_reply  # render_chat also marks the prompt's assistant turns: context here


def test_filters_drop_and_count_each_rule(tok):
    long = "word " * 300
    pairs = [
        Pair((("user", "Q"),), "A", "B"),
        Pair((("user", "Q"),), "   ", "B"),  # empty reply
        Pair((("user", "Q"),), "same", "same"),  # identical
        Pair((("user", long),), "A", "B"),  # prompt over the limit
        Pair((("user", "Q"),), "A", long),  # a reply over the limit
        Pair((("user", "Q " * 40),), "A " * 40, "B"),
    ]  # fits the limits, not the row
    data = build_preference_data(pairs, 64, max_prompt_tokens=50, max_response_tokens=50, val_fraction=0)
    s = data.stats
    assert (
        s["loaded"],
        s["kept"],
        s["dropped_empty"],
        s["dropped_identical"],
        s["dropped_prompt"],
        s["dropped_response"],
        s["dropped_too_long"],
    ) == (6, 1, 1, 1, 1, 1, 1)
    assert s["train_pairs"] == 1 and s["val_pairs"] == 0 and data.train.tokens.shape == (2, 65)
    assert s["truncated_prompt"] == s["truncated_response"] == 0


def test_truncation_cuts_inside_the_template(tok):
    conv = (("system", "Be brief."), ("user", "first " * 30), ("assistant", "answer " * 30), ("user", "last " * 30))
    pair = Pair(conv, "good " * 100, "bad " * 10)
    data = build_preference_data(
        [pair], 128, max_prompt_tokens=20, max_response_tokens=50, truncate=True, val_fraction=0
    )
    assert data.stats["truncated_prompt"] == data.stats["truncated_response"] == data.stats["kept"] == 1
    row, mask = data.train.tokens[0].tolist(), data.train.mask[0]
    system, _ = tok.render_chat([{"role": "system", "content": "Be brief."}])
    prompt_len = 20
    assert row[: len(system)] == system and row[len(system)] == tok.user_id  # the oldest turns went first
    assert row[prompt_len - 2 : prompt_len] == [tok.end_id, tok.assistant_id]
    room = prompt_len - len(system) - 3  # the last user message's last tokens, between <|user|> and <|end|>
    assert row[len(system) + 1 : prompt_len - 2] == tok.encode("last " * 30)[-room:]
    assert (
        row[prompt_len : prompt_len + 50] == tok.encode("good " * 100)[:50]
    )  # the reply's first 50 tokens, no <|end|>
    assert mask.sum() == 50 and mask[prompt_len - 1 : prompt_len + 49].all()
    short = data.train.tokens[1].tolist()  # the rejected reply fits: whole, with its <|end|>
    n = len(tok.encode("bad " * 10)) + 1
    assert (
        short[prompt_len : prompt_len + n] == tok.encode("bad " * 10) + [tok.end_id] and data.train.mask[1].sum() == n
    )
    sys_only = Pair((("system", "x " * 30), ("user", "Q")), "A", "B")  # the system prompt leaves no room
    cut = build_preference_data([sys_only], 128, max_prompt_tokens=20, truncate=True, val_fraction=0)
    assert cut.stats["dropped_prompt"] == 1 and cut.stats["kept"] == 0


def test_split_is_stable_and_by_content():
    pairs = load_pairs(str(DEMO))
    a = build_preference_data(pairs, 4096, val_fraction=0.2)
    b = build_preference_data(pairs[::-1], 4096, val_fraction=0.2)  # order does not matter
    c = build_preference_data(pairs, 256, max_response_tokens=64, truncate=True, val_fraction=0.2)  # nor limits
    val = [p for p in pairs if in_val_split(p.key(), 0.2)]
    assert a.stats["val_pairs"] == b.stats["val_pairs"] == len(val) and 10 < len(val) < 40
    assert sorted(map(bytes, a.val.tokens)) == sorted(map(bytes, b.val.tokens))
    kept_val = c.stats["val_pairs"]
    assert kept_val <= len(val) and c.stats["train_pairs"] + kept_val == c.stats["kept"]
    assert build_preference_data(pairs, 4096, val_fraction=0).stats["val_pairs"] == 0


# -- batches ---------------------------------------------------------------------------------------
def _rows(n_pairs=10, seq_len=8):
    pairs = [Pair((("user", f"question {i}"),), f"yes {i}", f"no {i}") for i in range(n_pairs)]
    data = build_preference_data(pairs, seq_len, val_fraction=0)
    ref = -np.arange(2 * n_pairs, dtype=np.float32)  # row r's reference log-prob is -r: rows are traceable
    return data.train, ref


def test_pair_loader_keeps_pairs_whole_and_visits_each_once_per_epoch():
    rows, ref = _rows(10)
    loader = PairLoader(rows, ref, global_batch_size=4, seed=3, prefetch=0)
    seen = []
    for k in range(5):  # 20 pairs: two epochs
        b = loader.batch(k)
        assert isinstance(b, PreferenceBatch) and b.tokens.shape == (8, 9) and b.ref_logp.shape == (8,)
        r = (-b.ref_logp).astype(int)
        assert (r[0::2] % 2 == 0).all() and (r[1::2] == r[0::2] + 1).all()  # (chosen, rejected) of one pair
        np.testing.assert_array_equal(b.tokens, rows.tokens[r])
        np.testing.assert_array_equal(b.mask, rows.mask[r])
        seen += list(r[0::2] // 2)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a fresh permutation per epoch
    again = PairLoader(rows, ref, global_batch_size=4, seed=3, prefetch=0)
    np.testing.assert_array_equal(again.batch(3).tokens, loader.batch(3).tokens)  # a pure function of (seed, k)


def test_pair_loader_processes_and_state():
    rows, ref = _rows(10)
    whole = PairLoader(rows, ref, global_batch_size=4, seed=1, prefetch=0)
    parts = [
        PairLoader(rows, ref, global_batch_size=4, seed=1, process_index=p, process_count=2, prefetch=0)
        for p in range(2)
    ]
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([p.batch(k).ref_logp for p in parts]), whole.batch(k).ref_logp)
    next(whole), next(whole)
    state = whole.get_state()
    resumed = PairLoader(rows, ref, global_batch_size=4, seed=1, prefetch=0)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed).ref_logp, whole.batch(2).ref_logp)
    other_reference = PairLoader(rows, ref + 1, global_batch_size=4, seed=1, prefetch=0)
    with pytest.raises(ValueError, match="preference data state: saved reference_hash="):
        other_reference.set_state(state)
    with pytest.raises(ValueError, match="reference log-probs of shape"):
        PairLoader(rows, ref[:-1], global_batch_size=4)


def test_val_pairs_pad_with_empty_pairs():
    rows, ref = _rows(5)
    batches = val_pairs(rows, ref, batch_pairs=4, pad_id=50256)
    assert len(batches) == 2 and all(b.tokens.shape == (8, 9) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.ref_logp for b in batches])[:10], ref)
    last = batches[-1]
    assert last.mask[2:].sum() == 0 and (last.ref_logp[2:] == 0).all() and (last.tokens[2:] == 50256).all()
    halves = [val_pairs(rows, ref, batch_pairs=4, pad_id=50256, process_index=p, process_count=2) for p in range(2)]
    for k in range(2):
        np.testing.assert_array_equal(np.concatenate([h[k].tokens for h in halves]), batches[k].tokens)
