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
        s.history += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i}"}]
    s.history.append({"role": "user", "content": "last one"})
    ids = s.context_ids()
    assert len(ids) <= 64 - 16
    assert s.history[-1]["content"] == "last one" and s.history[0]["content"] != "question 0 " * 3
    assert get_tokenizer().decode(ids).startswith("<|endoftext|><|system|>Be brief.<|end|>")
    assert ids[-1] == get_tokenizer().assistant_id
