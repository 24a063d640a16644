// The chat page: a multi-turn conversation with /v1/chat/completions, replies streamed as server-sent
// events. Plain browser JavaScript, no build step and no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, model: null };

function apiKey() { return $("api-key").value.trim(); }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.textContent = text;
  $("messages").appendChild(el);
  $("messages").scrollTop = $("messages").scrollHeight;
  return el;
}

function addMeta(el, text) {
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = text;
  el.appendChild(meta);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) {
      $("key-box").hidden = false;
      $("model").textContent = "API key required";
      return;
    }
    const card = (await r.json()).data[0];
    state.model = card.id;
    $("model").textContent = `${card.id} · context ${card.max_model_len}`;
    $("max-tokens").max = card.max_model_len - 1;
    $("max-tokens").value = Math.min(256, Math.floor(card.max_model_len / 2));
    if (!card.instruction_tuned) {
      $("notice").hidden = false;
      $("notice").textContent = "This is a base model (not instruction-tuned): its replies continue text rather " +
        "than follow instructions.";
    }
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// Read a server-sent-event stream, calling onEvent with each parsed `data:` object until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history,
    [{ role: "user", content: text }]);
  addMessage("user", text);
  const out = addMessage("assistant streaming", "");
  const body = {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  if (state.model) body.model = state.model;
  state.controller = new AbortController();
  setBusy(true);
  setStatus("generating…");
  let reply = "", finish = null, usage = null, trimmed = null, error = null;
  const started = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                   signal: state.controller.signal });
    if (!r.ok) {
      if (r.status === 401) $("key-box").hidden = false;
      const err = await r.json().catch(() => ({}));
      throw new Error(`${r.status}: ${(err.error && err.error.message) || r.statusText}`);
    }
    await readEvents(r, (ev) => {
      if (ev.error) { error = ev.error.message; return; }
      if (ev.trimmed) trimmed = ev.trimmed;
      if (ev.usage) usage = ev.usage;
      for (const c of ev.choices || []) {
        if (c.delta && c.delta.content) { reply += c.delta.content; out.textContent = reply; }
        if (c.finish_reason) finish = c.finish_reason;
      }
      $("messages").scrollTop = $("messages").scrollHeight;
    });
    if (error) throw new Error(error);
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { out.remove(); addMessage("error", String(e.message || e)); }
  } finally {
    out.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
  }
  if (!out.isConnected) { setStatus(""); return; }
  // The conversation keeps what was shown, stopped replies included (as the chat CLI keeps its answers).
  state.history.push({ role: "user", content: text }, { role: "assistant", content: reply });
  const secs = (performance.now() - started) / 1000;
  const parts = [finish === "length" ? "stopped at max tokens" : finish === "stopped" ? "stopped" : "done"];
  if (usage) parts.push(`${usage.completion_tokens} tokens, ${(usage.completion_tokens / secs).toFixed(1)} tok/s`);
  if (trimmed && trimmed.messages) parts.push(`${trimmed.messages} oldest messages dropped to fit the context`);
  addMeta(out, parts.join(" · "));
  setStatus("");
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });

$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  setStatus("new chat");
  $("input").focus();
});

$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
$("api-key").addEventListener("change", loadModel);
loadModel();
