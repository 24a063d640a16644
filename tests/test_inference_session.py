"""ChatSession: a conversation kept within the context."""

import pytest
from flax import nnx

from fgpt_jax.inference.generator import Generator
from fgpt_jax.inference.session import ChatSession
from fgpt_jax.model import GPT, GPTConfig
from fgpt_jax.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def generator():
    return Generator.from_model(GPT(GPTConfig.preset("tiny", n_layer=2, block_size=64), rngs=nnx.Rngs(0)))


def test_chat_session_trims_oldest_turns(generator):
    s = ChatSession(generator, system="Be brief.", max_new_tokens=16, temperature=0)
    for i in range(6):
        s.history += [
            {"role": "user", "content": f"question {i} " * 3},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    s.history.append({"role": "user", "content": "last one"})
    ids = s.context_ids()
    assert len(ids) <= 64 - 16
    assert s.history[-1]["content"] == "last one" and s.history[0]["content"] != "question 0 " * 3
    assert get_tokenizer().decode(ids).startswith("<|endoftext|><|system|>Be brief.<|end|>")
    assert ids[-1] == get_tokenizer().assistant_id


def test_over_long_message_keeps_its_tail_in_an_intact_template(generator):
    tok = get_tokenizer()
    s = ChatSession(generator, system="Be brief.", max_new_tokens=16, temperature=0)
    words = " ".join(f"w{i}" for i in range(300))
    s.history.append({"role": "user", "content": words})
    ids = s.context_ids()
    assert len(ids) == 64 - 16
    assert tok.decode(ids).startswith("<|endoftext|><|system|>Be brief.<|end|><|user|>")
    assert ids[-2:] == [tok.end_id, tok.assistant_id]
    assert tok.decode(ids[:-2]).endswith(" w298 w299")  # the message's last words
    assert s.history[-1]["content"] == words  # the history keeps the whole message


def test_answers_longer_than_the_context(generator):
    """max_new_tokens past the context (chat's default 256 on a 64-token model): the prompt keeps
    room for half the context and the answer goes on with the sliding window."""
    no_stops = Generator(generator.graphdef, generator.params, stop_ids=())
    s = ChatSession(no_stops, max_new_tokens=100, temperature=0)
    assert s.reserve == 32
    answer = "".join(s.reply("Tell me a long story."))
    ids = get_tokenizer().render_chat(
        [{"role": "user", "content": "Tell me a long story."}], add_generation_prompt=True
    )[0]
    assert len(ids) <= 64 - 32
    assert answer == get_tokenizer().decode(no_stops.generate([ids], 100, temperature=0)[0])
    assert s.history[-1] == {"role": "assistant", "content": answer}
