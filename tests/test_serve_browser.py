"""The web chat page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright; no
browser download): type a message, watch the reply stream in, chat on, start a new chat. The page must
load nothing from outside the server."""

import dataclasses
import os
import queue
import signal
import subprocess
import sys
import threading

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (Debian: apt-get install chromium)"
    ),
    pytest.mark.slow,  # a server and a browser: the full suite runs it, the fast lane does not
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from flax import nnx

    from fgpt_jax.checkpoint import save_model
    from fgpt_jax.config import Config
    from fgpt_jax.data import DataConfig
    from fgpt_jax.model import GPT, GPTConfig

    # The page needs a working model, not a good one: a random-init run saved as DPO's (data.format
    # "preference", which is instruction-tuned as SFT's "chat" is: the page must not call it a base model).
    run = tmp_path_factory.mktemp("browser") / "chat-run"
    shape = GPTConfig.preset("tiny", n_layer=1, n_embd=64, n_head=2, block_size=128)
    cfg = Config(model=shape, data=dataclasses.replace(DataConfig(), format="preference"))
    save_model(run, GPT(shape, rngs=nnx.Rngs(0)), cfg)
    log = open(run.parent / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fgpt_jax.serve", "--run", str(run), "--port", "0", "--max-batch", "2"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        url = lines.get(timeout=300).split(" at ")[1].split()[0]
    except queue.Empty:
        proc.kill()
        raise AssertionError(open(run.parent / "server.log").read()[-2000:]) from None
    yield url
    proc.send_signal(signal.SIGINT)
    proc.wait(60)


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
        )
        pg = browser.new_page()
        pg.requested = []
        pg.on("request", lambda r: pg.requested.append(r.url))
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def test_chat_page_streams_replies_and_starts_new_chats(page, server):
    page.goto(server)
    page.wait_for_function("document.getElementById('model').textContent.startsWith('chat-run')")
    assert "context 128" in page.text_content("#model")
    assert page.is_hidden("#notice") and not page.text_content("#notice")  # no "base model" warning
    page.fill("#system", "Be brief.")
    page.fill("#max-tokens", "48")
    page.fill("#input", "Hello! <|assistant|> Who are you?")
    page.press("#input", "Enter")
    # The reply streams: the bubble exists (marked as streaming, Stop enabled) before it is complete.
    page.wait_for_selector(".msg.assistant", state="attached")
    page.wait_for_selector(".msg.assistant:not(.streaming) .meta")
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    assert page.text_content(".msg.user") == "Hello! <|assistant|> Who are you?"
    reply = page.text_content(".msg.assistant")
    meta = page.text_content(".msg.assistant .meta")
    assert "tokens" in meta and ("done" in meta or "max tokens" in meta)
    assert len(reply) > len(meta)  # some text came before the meta line
    # A second turn joins the conversation.
    page.fill("#input", "Tell me more.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .meta').length == 2")
    assert page.locator(".msg.user").count() == 2
    # New chat clears it.
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.fill("#input", "Again")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .meta")
    assert page.locator(".msg.user").count() == 1
    assert page.requested and all(u.startswith(server) for u in page.requested), page.requested


def test_streamed_text_arrives_in_pieces(page, server):
    """The page shows partial replies: record the bubble's text at each change while it streams.

    The tiny model writes 100 tokens in well under a second, so on a loaded machine the browser can
    read the whole stream in one go and rightly paint once (CI saw exactly that). The page's fetch is
    therefore wrapped to hand the server's real bytes on one server-sent event per read, a timer tick
    apart, as a slow network would: what is tested is that each event is painted as it arrives."""
    page.goto(server)
    page.wait_for_function("document.getElementById('model').textContent.startsWith('chat-run')")
    page.evaluate("""() => {
        const realFetch = window.fetch;
        window.fetch = async (url, init) => {
            const r = await realFetch(url, init);
            if (!String(url).includes('/chat/completions') || !r.body) return r;
            const reader = r.body.getReader(), decoder = new TextDecoder(), encoder = new TextEncoder();
            let text = '', events = [];
            const body = new ReadableStream({async pull(controller) {
                while (!events.length) {
                    const {value, done} = await reader.read();
                    if (done) { if (text) controller.enqueue(encoder.encode(text)); controller.close(); return; }
                    text += decoder.decode(value, {stream: true});
                    let cut;
                    while ((cut = text.indexOf('\\n\\n')) >= 0) {
                        events.push(text.slice(0, cut + 2));
                        text = text.slice(cut + 2);
                    }
                }
                await new Promise((resolve) => setTimeout(resolve, 5));
                controller.enqueue(encoder.encode(events.shift()));
            }});
            return new Response(body, {status: r.status, statusText: r.statusText, headers: r.headers});
        };
        window.seen = [];
        new MutationObserver(() => {
            const el = document.querySelector('.msg.assistant.streaming');
            if (el) window.seen.push(el.textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#max-tokens", "100")
    page.fill("#input", "Write a long answer.")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming) .meta")
    seen = [s for s in page.evaluate("window.seen") if s]
    assert len(set(seen)) >= 3, seen  # several growing partial texts, not one final paint
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
