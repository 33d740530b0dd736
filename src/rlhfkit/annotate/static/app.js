// rlhfkit annotate: rank K responses with the mouse (click in order) or the keyboard
// (number keys in order, Backspace to undo, Enter to submit). No framework, no build step.
"use strict";

const state = { item: null, order: [], unsafe: new Set(), wrong: new Set(), busy: false };
const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = {};
  try { data = await r.json(); } catch (e) { /* empty body */ }
  return { status: r.status, data };
}

function show(section) {
  for (const id of ["login", "work", "finished"]) $(id).hidden = id !== section;
  $("signout").hidden = section === "login";
}

async function start() {
  const me = await api("GET", "/api/me");
  if (me.status === 401) { show("login"); $("token").focus(); return; }
  $("who").textContent = me.data.name;
  await loadNext();
}

async function loadNext() {
  const r = await api("GET", "/api/next");
  if (r.status === 401) { show("login"); return; }
  $("progress").textContent = `${r.data.done} / ${r.data.total}`;
  if (!r.data.item) { state.item = null; show("finished"); return; }
  state.item = r.data.item;
  state.order = [];
  state.unsafe = new Set();
  state.wrong = new Set();
  $("status").textContent = "";
  render();
  show("work");
}

function render() {
  const item = state.item;
  $("prompt").textContent = item.prompt;
  const box = $("responses");
  box.replaceChildren();
  item.responses.forEach((text, i) => {
    const card = document.createElement("div");
    card.className = "card response";
    card.dataset.index = String(i);
    card.id = `response-${i}`;
    const h = document.createElement("h3");
    const title = document.createElement("span");
    title.textContent = `Response ${i + 1}`;
    const badge = document.createElement("span");
    badge.className = "badge";
    const lab = document.createElement("label");
    lab.className = "unsafe-label";
    const cb = document.createElement("input");
    cb.type = "checkbox";
    cb.className = "unsafe";
    cb.id = `unsafe-${i}`;
    cb.addEventListener("click", (e) => e.stopPropagation());
    cb.addEventListener("change", () => { cb.checked ? state.unsafe.add(i) : state.unsafe.delete(i); update(); });
    lab.addEventListener("click", (e) => e.stopPropagation());
    lab.append(cb, " unsafe");
    h.append(title, badge, lab);
    card.append(h);
    text.split("\n").forEach((line, j) => {
      const row = document.createElement("div");
      row.className = "line";
      row.dataset.line = String(j);
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "✗";
      b.title = "mark this step wrong";
      b.className = "wrong-step";
      b.addEventListener("click", (e) => {
        e.stopPropagation();
        const key = `${i}:${j}`;
        state.wrong.has(key) ? state.wrong.delete(key) : state.wrong.add(key);
        update();
      });
      const span = document.createElement("span");
      span.textContent = line;
      row.append(b, span);
      card.append(row);
    });
    card.addEventListener("click", () => pick(i, true));
    box.append(card);
  });
  update();
}

function update() {
  const item = state.item;
  if (!item) return;
  item.responses.forEach((_, i) => {
    const card = $(`response-${i}`);
    const rank = state.order.indexOf(i);
    card.classList.toggle("picked", rank >= 0);
    card.classList.toggle("unsafe", state.unsafe.has(i));
    card.querySelector(".badge").textContent = rank >= 0 ? `#${rank + 1}` : "";
    card.querySelectorAll(".line").forEach((row) => {
      row.classList.toggle("wrong", state.wrong.has(`${i}:${row.dataset.line}`));
    });
  });
  $("order").textContent = state.order.length ? state.order.map((i) => i + 1).join(" > ") : "—";
  $("submit").disabled = state.order.length !== item.responses.length || state.busy;
}

function pick(i, toggle) {
  if (!state.item || state.busy) return;
  const at = state.order.indexOf(i);
  if (at >= 0) {
    if (toggle) state.order.splice(at, 1); // a second click on a card takes it out again
  } else {
    state.order.push(i);
  }
  update();
}

function undo() {
  state.order.pop();
  update();
}

async function submit() {
  const item = state.item;
  if (!item || state.busy || state.order.length !== item.responses.length) return;
  state.busy = true;
  update();
  const wrong = [...state.wrong].map((k) => k.split(":").map(Number)).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const r = await api("POST", `/api/items/${item.item_id}/ranking`,
    { ranking: state.order, unsafe: [...state.unsafe].sort((a, b) => a - b), wrong_steps: wrong });
  state.busy = false;
  if (r.status === 201 || r.status === 409) { await loadNext(); return; }
  if (r.status === 401) { show("login"); return; }
  $("status").textContent = r.data.error || `error ${r.status}`;
  update();
}

document.addEventListener("keydown", (e) => {
  if ($("work").hidden || e.target.tagName === "INPUT") return;
  if (e.key >= "1" && e.key <= "9") {
    const i = Number(e.key) - 1;
    if (state.item && i < state.item.responses.length) pick(i, false);
  } else if (e.key === "Backspace") {
    e.preventDefault();
    undo();
  } else if (e.key === "Enter") {
    e.preventDefault();
    submit();
  }
});

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await api("POST", "/api/login", { token: $("token").value.trim() });
  if (r.status !== 200) { $("login-error").textContent = r.data.error || "sign-in failed"; return; }
  $("token").value = "";
  $("login-error").textContent = "";
  $("token").blur();
  $("who").textContent = r.data.name;
  await loadNext();
});
$("undo").addEventListener("click", undo);
$("submit").addEventListener("click", submit);
$("signout").addEventListener("click", async () => { await api("POST", "/api/logout"); location.reload(); });

start();
