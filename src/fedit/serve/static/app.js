// The fedit web page: chat with one served model, ask several at once (arena), or vote
// between two hidden ones (blind battles).
// Plain JavaScript over the server's own OpenAI-compatible API; no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { models: [], defaultModel: null, history: [], question: null, battle: null };

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
  return body;
}

// POST a streaming chat completion; onText gets each delta, the promise the final stats.
async function streamChat(model, messages, onText, signal) {
  const t0 = performance.now();
  const r = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", usage = null, finish = null, first = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          if (c.delta && c.delta.content) {
            if (first === null) first = performance.now();
            onText(c.delta.content);
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
  }
  const seconds = (performance.now() - t0) / 1000;
  return { usage, finish, seconds, firstToken: first === null ? null : (first - t0) / 1000 };
}

function info(id) {
  return state.models.find((m) => m.id === id) || {};
}

function describe(m) {
  const parts = [`template ${m.template}`];
  if (m.strategy) parts.push(m.strategy);
  if (m.rounds) parts.push(m.rounds === 1 ? "1 round" : `${m.rounds} rounds`);
  if (m.heldout_loss !== undefined) parts.push(`held-out loss ${m.heldout_loss}`);
  if (!m.adapter) parts.push("no adapter");
  return parts.join(" · ");
}

function statsLine(s) {
  const n = s.usage ? s.usage.completion_tokens : "?";
  const first = s.firstToken === null ? "" : `, first token ${s.firstToken.toFixed(1)} s`;
  return `${n} tokens in ${s.seconds.toFixed(1)} s${first} (${s.finish || "?"})`;
}

// ---- chat --------------------------------------------------------------------------------
function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : $("#chat-model").value;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("#chat-log").append(div);
  $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
  return body;
}

async function sendChat(ev) {
  ev.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  $("#chat-send").disabled = true;
  addTurn("user", text);
  state.history.push({ role: "user", content: text });
  const out = addTurn("assistant", "");
  try {
    let answer = "";
    const s = await streamChat($("#chat-model").value, state.history, (t) => {
      answer += t;
      out.textContent = answer;
    });
    state.history.push({ role: "assistant", content: answer });
    out.parentElement.title = statsLine(s);
  } catch (e) {
    out.classList.add("error");
    out.textContent = String(e.message || e);
    state.history.pop();
  } finally {
    $("#chat-send").disabled = false;
  }
}

// ---- arena -------------------------------------------------------------------------------
function chosenModels() {
  return [...document.querySelectorAll("#arena-models input:checked")].map((i) => i.value);
}

async function randomQuestion() {
  const { questions } = await getJSON("/fedit/questions");
  if (!questions.length) throw new Error("the held-out split is empty");
  let q = questions[Math.floor(Math.random() * questions.length)];
  if (questions.length > 1 && state.question) {
    while (q.instruction === state.question.instruction) {
      q = questions[Math.floor(Math.random() * questions.length)];
    }
  }
  return q;
}

async function pickQuestion() {
  try {
    const q = await randomQuestion();
    state.question = q;
    $("#arena-prompt").value = q.context ? `${q.instruction}\n\n${q.context}` : q.instruction;
    $("#arena-reference-text").textContent = q.reference;
    $("#arena-category").textContent = `(${q.category})`;
    $("#arena-reference").classList.remove("hidden");
  } catch (e) {
    alert(`No held-out questions: ${e.message || e}`);
  }
}

async function askAll(ev) {
  ev.preventDefault();
  const prompt = $("#arena-prompt").value.trim();
  const models = chosenModels();
  if (!prompt || models.length === 0) return;
  if (!state.question || $("#arena-prompt").value.indexOf(state.question.instruction) !== 0) {
    $("#arena-reference").classList.add("hidden");
    state.question = null;
  }
  $("#arena-ask").disabled = true;
  const grid = $("#arena-answers");
  grid.replaceChildren();
  const runs = models.map(async (id) => {
    const card = document.createElement("div");
    card.className = "card answer";
    card.dataset.model = id;
    const h = document.createElement("h3");
    h.textContent = id;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = describe(info(id));
    const format = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "prompt format";
    const pre = document.createElement("pre");
    pre.textContent = info(id).prompt_format || "";
    format.append(summary, pre);
    meta.append(format);
    const text = document.createElement("div");
    text.className = "text";
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = "waiting…";
    card.append(h, meta, text, stats);
    grid.append(card);
    let answer = "";
    try {
      const s = await streamChat(id, [{ role: "user", content: prompt }], (t) => {
        answer += t;
        text.textContent = answer;
        stats.textContent = "streaming…";
      });
      stats.textContent = statsLine(s);
    } catch (e) {
      text.classList.add("error");
      text.textContent = String(e.message || e);
      stats.textContent = "failed";
    }
    card.dataset.done = "1";
  });
  await Promise.all(runs);
  $("#arena-ask").disabled = false;
}

// ---- blind votes -------------------------------------------------------------------------
async function postJSON(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  const reply = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(reply.error ? reply.error.message : `HTTP ${r.status}`);
  return reply;
}

// One side's answer of a battle, streamed; the events name no model.
async function streamSide(id, side, onText) {
  const t0 = performance.now();
  const r = await fetch(`/fedit/battles/${id}/${side}`, { method: "POST" });
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", done = false;
  for (;;) {
    const chunk = await reader.read();
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const event = JSON.parse(line.slice(6));
      if (event.error) throw new Error(event.error.message);
      if (event.text) onText(event.text);
      if (event.done) done = true;
    }
  }
  if (!done) throw new Error("the answer was cut off");
  return (performance.now() - t0) / 1000;
}

function voteButtons(enabled) {
  for (const b of document.querySelectorAll("#vote-buttons button")) b.disabled = !enabled;
}

async function countVotes() {
  const v = await getJSON("/fedit/votes");
  $("#vote-count").textContent = `${v.votes} votes so far`;
}

async function askTwo(ev) {
  ev.preventDefault();
  const prompt = $("#vote-prompt").value.trim();
  if (!prompt) return;
  $("#vote-ask").disabled = true;
  voteButtons(false);
  $("#vote-result").textContent = "";
  try {
    const { id } = await postJSON("/fedit/battles", { prompt });
    state.battle = id;
    for (const side of ["a", "b"]) {
      const card = $(`#vote-${side}`);
      card.querySelector("h3").textContent = `Model ${side.toUpperCase()}`;
      card.querySelector(".text").textContent = "";
      card.querySelector(".stats").textContent = "waiting…";
      delete card.dataset.done;
    }
    for (const side of ["a", "b"]) {  // the server answers one at a time anyway
      const card = $(`#vote-${side}`);
      let answer = "";
      const seconds = await streamSide(id, side, (t) => {
        answer += t;
        card.querySelector(".text").textContent = answer;
        card.querySelector(".stats").textContent = "streaming…";
      });
      card.querySelector(".stats").textContent = `${seconds.toFixed(1)} s`;
      card.dataset.done = "1";
    }
    voteButtons(true);
  } catch (e) {
    $("#vote-result").textContent = `failed: ${e.message || e}`;
  }
  $("#vote-ask").disabled = false;
}

async function castVote(winner) {
  voteButtons(false);
  try {
    const r = await postJSON(`/fedit/battles/${state.battle}/vote`, { winner });
    $("#vote-a h3").textContent = `Model A: ${r.model_a}`;
    $("#vote-b h3").textContent = `Model B: ${r.model_b}`;
    const said = { a: "A is better", b: "B is better", tie: "a tie", bad: "both are bad" }[winner];
    $("#vote-result").textContent = `Thanks: you said ${said}. A was ${r.model_a}, B was ${r.model_b}.`;
    $("#vote-result").dataset.voted = String(Number($("#vote-result").dataset.voted || 0) + 1);
    await countVotes();
  } catch (e) {
    $("#vote-result").textContent = `not counted: ${e.message || e}`;
  }
}

// ---- start -------------------------------------------------------------------------------
function show(view) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.view === view);
  for (const v of document.querySelectorAll(".view")) v.classList.toggle("hidden", v.id !== `view-${view}`);
}

async function start() {
  const data = await getJSON("/fedit/models");
  state.models = data.models;
  state.defaultModel = data.default;
  $("#base-model").textContent = `base model ${data.base_model}`;
  const select = $("#chat-model");
  const box = $("#arena-models");
  for (const m of data.models) {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = m.id;
    if (m.id === data.default) opt.selected = true;
    select.append(opt);
    const label = document.createElement("label");
    const check = document.createElement("input");
    check.type = "checkbox";
    check.value = m.id;
    check.checked = true;
    label.append(check, ` ${m.id}`);
    label.title = describe(m);
    box.append(label);
  }
  const updateTemplate = () => { $("#chat-template").textContent = describe(info(select.value)); };
  select.addEventListener("change", () => { state.history = []; $("#chat-log").replaceChildren(); updateTemplate(); });
  updateTemplate();
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => show(b.dataset.view));
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  $("#chat-reset").addEventListener("click", () => { state.history = []; $("#chat-log").replaceChildren(); });
  $("#arena-form").addEventListener("submit", askAll);
  $("#arena-question").addEventListener("click", pickQuestion);
  try {  // votes are on where the server keeps a votes file
    await countVotes();
    $("#tab-vote").classList.remove("hidden");
    $("#vote-form").addEventListener("submit", askTwo);
    $("#vote-question").addEventListener("click", async () => {
      try {
        const q = await randomQuestion();
        $("#vote-prompt").value = q.context ? `${q.instruction}\n\n${q.context}` : q.instruction;
      } catch (e) { alert(`No held-out questions: ${e.message || e}`); }
    });
    for (const b of document.querySelectorAll("#vote-buttons button")) {
      b.addEventListener("click", () => castVote(b.dataset.winner));
    }
  } catch (e) { /* no votes file: no Vote tab */ }
  if (location.hash === "#arena") show("arena");
  if (location.hash === "#vote") show("vote");
  document.body.dataset.ready = "1";
}

start().catch((e) => {
  document.querySelector("main").prepend(Object.assign(document.createElement("p"),
    { className: "error", textContent: `cannot reach the server: ${e.message || e}` }));
});
