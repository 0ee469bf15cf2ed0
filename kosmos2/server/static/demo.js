// The kosmos2 web demo: plain JavaScript, no build step. It calls the native API with `stream: true` and
// renders the server-sent events: `text` pieces join into the caption, each `entity` brings a phrase's
// span and boxes (drawn in the phrase's colour), `done` carries the whole result (offered as JSON).
"use strict";

const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#008080", "#f032e6", "#9a6324",
                 "#800000", "#000075"];
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

const state = { dataUrl: null, width: 0, height: 0, caption: "", promptLength: 0, entities: [], result: null,
                userBox: null, running: false };

// -- the image ------------------------------------------------------------------------------------------

function loadFile(file) {
  if (!file || !file.type.startsWith("image/")) { setStatus("That is not an image file.", true); return; }
  const reader = new FileReader();
  reader.onload = () => {
    state.dataUrl = reader.result;
    const img = $("image");
    img.onload = () => {
      state.width = img.naturalWidth; state.height = img.naturalHeight;
      $("overlay").setAttribute("viewBox", `0 0 ${state.width} ${state.height}`);
      $("image-info").textContent = `${file.name}: ${state.width} × ${state.height} px`;
      $("stage").hidden = false; $("drop-hint").hidden = true;
      clearResult(); state.userBox = null; drawUserBox(); updateForm();
    };
    img.src = state.dataUrl;
  };
  reader.readAsDataURL(file);
}

$("file").addEventListener("change", (e) => loadFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) loadFile(e.dataTransfer.files[0]);
});

// -- drawing a box with the mouse (describe) -----------------------------------------------------------

function imagePoint(e) {
  const r = $("overlay").getBoundingClientRect();
  const x = Math.min(Math.max(e.clientX - r.left, 0), r.width), y = Math.min(Math.max(e.clientY - r.top, 0), r.height);
  return [x * state.width / r.width, y * state.height / r.height];
}

let dragStart = null;
$("overlay").addEventListener("mousedown", (e) => {
  if ($("task").value !== "describe") return;
  e.preventDefault(); dragStart = imagePoint(e);
});
window.addEventListener("mousemove", (e) => {
  if (!dragStart) return;
  const [x, y] = imagePoint(e);
  state.userBox = [Math.min(dragStart[0], x), Math.min(dragStart[1], y), Math.max(dragStart[0], x), Math.max(dragStart[1], y)];
  drawUserBox();
});
window.addEventListener("mouseup", () => {
  if (!dragStart) return;
  dragStart = null;
  const b = state.userBox;
  if (b && (b[2] - b[0] < 2 || b[3] - b[1] < 2)) state.userBox = null;  // a click, not a box
  drawUserBox(); updateForm();
});

function drawUserBox() {
  const svg = $("overlay");
  svg.querySelectorAll(".user-box").forEach((n) => n.remove());
  if (!state.userBox || $("task").value !== "describe") return;
  const [x1, y1, x2, y2] = state.userBox;
  const r = document.createElementNS(SVG, "rect");
  r.setAttribute("class", "user-box");
  r.setAttribute("x", x1); r.setAttribute("y", y1); r.setAttribute("width", x2 - x1); r.setAttribute("height", y2 - y1);
  svg.appendChild(r);
}

// -- the form ----------------------------------------------------------------------------------------

function updateForm() {
  const task = $("task").value;
  $("text-row").hidden = !(task === "locate" || task === "vqa");
  $("text-label").textContent = task === "vqa" ? "Question" : "Expression";
  $("box-hint").hidden = task !== "describe";
  drawUserBox();
  const ready = state.dataUrl && !state.running &&
    (task === "ground" || (task === "describe" ? !!state.userBox : $("text").value.trim() !== ""));
  $("run").disabled = !ready;
}
$("task").addEventListener("change", updateForm);
$("text").addEventListener("input", updateForm);

function setStatus(message, error = false) {
  $("status").textContent = message;
  $("status").className = error ? "error" : "muted";
}

function requestBody() {
  const task = $("task").value, text = $("text").value.trim();
  const body = { image: state.dataUrl, stream: true };
  if (task === "locate") body.expression = text;
  if (task === "vqa") { body.question = text; body.grounded = true; }
  if (task === "describe") body.box = state.userBox.map((v) => Math.round(v * 100) / 100);
  return [task, body];
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if ($("run").disabled) return;
  const [task, body] = requestBody();
  clearResult(); state.running = true; updateForm(); setStatus("Generating…");
  const headers = { "Content-Type": "application/json" };
  if ($("key").value) headers.Authorization = `Bearer ${$("key").value}`;
  const t0 = performance.now();
  try {
    const response = await fetch(`/v1/${task}`, { method: "POST", headers, body: JSON.stringify(body) });
    if (!response.ok) {
      const err = await response.json().catch(() => ({ error: { message: response.statusText } }));
      if (response.status === 401) $("key-row").hidden = false;
      throw new Error(err.error ? err.error.message : response.statusText);
    }
    await readEvents(response, (event, data) => onEvent(event, data));
    setStatus(`Done in ${((performance.now() - t0) / 1000).toFixed(2)} s.`);
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    state.running = false; updateForm();
  }
});

$("download").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify(state.result, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "kosmos2-result.json";
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
});

// -- server-sent events over fetch (EventSource cannot POST) -------------------------------------------

async function readEvents(response, handle) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) handle(event, JSON.parse(data));
    }
  }
}

function onEvent(event, data) {
  if (event === "text") {
    // the first piece is the prompt's own text (every task's prompt has some): shown grey
    if (!state.sawText) state.promptLength = data.text.length;
    state.caption += data.text; state.sawText = true;
  } else if (event === "entity") {
    state.entities.push(data);
  } else if (event === "done") {
    state.result = data; state.caption = data.caption; state.entities = data.entities;
    $("download").disabled = false;
  } else if (event === "error") {
    throw new Error(data.error.message);
  }
  render();
}

// -- rendering: coloured phrases and boxes, linked by hover -------------------------------------------

function clearResult() {
  Object.assign(state, { caption: "", entities: [], result: null, promptLength: 0, sawText: false });
  $("download").disabled = true;
  render();
}

function colour(i) { return PALETTE[i % PALETTE.length]; }

function render() {
  const out = $("output");
  out.textContent = "";
  const spans = state.entities.map((e, i) => ({ e, i })).filter(({ e }) => e.span && e.span[1] > e.span[0])
    .sort((a, b) => a.e.span[0] - b.e.span[0]);
  let at = 0;
  const plain = (from, to) => {
    if (to <= from) return;
    const cut = Math.min(Math.max(state.promptLength, from), to);
    if (cut > from) { const s = document.createElement("span"); s.className = "prompt"; s.textContent = state.caption.slice(from, cut); out.appendChild(s); }
    if (to > cut) out.appendChild(document.createTextNode(state.caption.slice(cut, to)));
  };
  for (const { e, i } of spans) {
    const [start, end] = e.span;
    if (start < at) continue;
    plain(at, start);
    const s = document.createElement("span");
    s.className = "phrase"; s.dataset.entity = i; s.textContent = state.caption.slice(start, end);
    s.style.background = colour(i) + "33"; s.style.borderColor = colour(i); s.style.color = "#111";
    s.addEventListener("mouseenter", () => highlight(i, true));
    s.addEventListener("mouseleave", () => highlight(i, false));
    out.appendChild(s);
    at = end;
  }
  plain(at, state.caption.length);
  drawBoxes();
}

function drawBoxes() {
  const svg = $("overlay");
  svg.querySelectorAll("g.entity").forEach((n) => n.remove());
  state.entities.forEach((e, i) => {
    const g = document.createElementNS(SVG, "g");
    g.setAttribute("class", "entity"); g.dataset.entity = i;
    for (const [x1, y1, x2, y2] of e.pixel_boxes) {
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("class", "box"); r.dataset.entity = i;
      r.setAttribute("x", x1); r.setAttribute("y", y1); r.setAttribute("width", x2 - x1); r.setAttribute("height", y2 - y1);
      r.setAttribute("stroke", colour(i));
      r.addEventListener("mouseenter", () => highlight(i, true));
      r.addEventListener("mouseleave", () => highlight(i, false));
      const t = document.createElementNS(SVG, "text");
      t.setAttribute("x", x1 + 4); t.setAttribute("y", y1 + 16); t.setAttribute("fill", colour(i));
      t.textContent = e.phrase.startsWith("<patch_index") ? "" : e.phrase;
      g.appendChild(r); g.appendChild(t);
    }
    svg.insertBefore(g, svg.firstChild);
  });
}

function highlight(i, on) {
  document.querySelectorAll(`[data-entity="${i}"]`).forEach((n) => {
    if (n.classList.contains("phrase") || n.classList.contains("box")) n.classList.toggle("hl", on);
  });
}

// -- start ---------------------------------------------------------------------------------------------

fetch("/health").then((r) => r.json()).then((h) => { $("model-name").textContent = `· ${h.model}`; }).catch(() => {});
updateForm();
