// The listening-test page: register a listener, then clip by clip show every version (video + four sliders),
// save each rating with POST /api/rate, and move on when all versions of the clip are saved.
// The page knows only opaque tokens and letters; which system made a version stays on the server.
"use strict";

const ASPECTS = [
  ["audio_quality", "Audio quality"],
  ["semantic_alignment", "Semantic alignment"],
  ["temporal_alignment", "Temporal alignment"],
  ["overall_quality", "Overall quality"],
];
const STORAGE_KEY = "listening-test-listener";
const state = { listener: null, clip: null, versions: [] };

const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let payload = {};
  try { payload = await response.json(); } catch (error) { payload = {}; }
  return { status: response.status, ok: response.ok, payload };
}

function show(section) {
  for (const id of ["welcome", "test", "done"]) $(id).hidden = id !== section;
}

async function start(event) {
  event.preventDefault();
  const input = $("listener");
  const listener = input.value.trim();
  $("login-error").textContent = "";
  if (!input.checkValidity() || listener === "") {
    $("login-error").textContent = "Please enter the listener ID you were given (letters, digits, '.', '_' or '-').";
    input.focus();
    return;
  }
  const result = await api("POST", "/api/listener", { listener });
  if (!result.ok) {
    $("login-error").textContent = result.payload.error || `The server refused (${result.status}).`;
    return;
  }
  state.listener = listener;
  try { localStorage.setItem(STORAGE_KEY, listener); } catch (error) { /* private mode: resume by typing the ID */ }
  await loadNext();
}

async function loadNext() {
  const result = await api("GET", `/api/next?listener=${encodeURIComponent(state.listener)}`);
  if (!result.ok) {
    show("welcome");
    $("login-error").textContent = result.payload.error || `The server refused (${result.status}).`;
    return;
  }
  const next = result.payload;
  if (next.done) {
    show("done");
    $("done-title").focus();
    return;
  }
  state.clip = next.clip;
  $("position").textContent = String(next.position);
  $("total").textContent = String(next.total);
  $("progress").max = next.total;
  $("progress").value = next.completed;
  $("status").textContent = "";
  const container = $("versions");
  container.replaceChildren();
  state.versions = next.versions.map((version) => renderVersion(version, container));
  updateNext();
  show("test");
  $("progress-title").focus();
}

function renderVersion(version, container) {
  const node = $("version-template").content.firstElementChild.cloneNode(true);
  const id = `v${version.label}`;
  node.setAttribute("aria-labelledby", `${id}-title`);
  node.dataset.stimulus = version.stimulus;
  const title = node.querySelector(".version-title");
  title.id = `${id}-title`;
  title.textContent = `Version ${version.label}`;
  const video = node.querySelector("video");
  video.src = version.src;
  video.setAttribute("aria-label", `Video, version ${version.label}`);
  video.addEventListener("play", () => {  // one soundtrack at a time
    for (const other of document.querySelectorAll("video")) if (other !== video) other.pause();
  });
  node.querySelector("legend").textContent = `Ratings of version ${version.label}`;
  const sliders = node.querySelector(".sliders");
  const entry = { version, node, inputs: {}, touched: new Set(), saved: version.scores !== null };
  for (const [key, title] of ASPECTS) {
    const row = document.createElement("div");
    row.className = "slider";
    const inputId = `${id}-${key}`;
    const label = document.createElement("label");
    label.htmlFor = inputId;
    label.textContent = title;
    const input = document.createElement("input");
    Object.assign(input, { type: "range", id: inputId, min: 0, max: 100, step: 1, value: 50, name: key });
    input.setAttribute("aria-describedby", `${inputId}-scale`);
    input.classList.add("is-unset");  // greyed until moved: the start position is not an answer
    const output = document.createElement("output");
    output.htmlFor = inputId;
    output.textContent = "not set";
    const scale = document.createElement("span");
    scale.className = "scale";
    scale.id = `${inputId}-scale`;
    scale.innerHTML = "<span>0 bad</span><span>100 excellent</span>";
    input.addEventListener("input", () => {
      entry.touched.add(key);
      input.classList.remove("is-unset");
      output.textContent = input.value;
      input.setAttribute("aria-valuetext", `${input.value} of 100`);
      updateSave(entry);
    });
    if (entry.saved) {
      input.value = version.scores[key];
      input.classList.remove("is-unset");
      output.textContent = String(version.scores[key]);
      input.disabled = true;
    }
    entry.inputs[key] = input;
    row.append(label, input, output, scale);
    sliders.append(row);
  }
  const save = node.querySelector(".save");
  save.textContent = `Save rating of version ${version.label}`;
  save.addEventListener("click", () => submit(entry));
  if (entry.saved) markSaved(entry, "Saved earlier.");
  else node.querySelector(".saved").textContent = "Move all four sliders to save.";
  container.append(node);
  return entry;
}

function updateSave(entry) {
  const ready = entry.touched.size === ASPECTS.length;
  entry.node.querySelector(".save").disabled = entry.saved || !ready;
  if (!entry.saved) {
    entry.node.querySelector(".saved").textContent = ready ? "" : `${ASPECTS.length - entry.touched.size} slider(s) left to set.`;
  }
}

function markSaved(entry, message) {
  entry.saved = true;
  for (const input of Object.values(entry.inputs)) input.disabled = true;
  entry.node.querySelector(".save").disabled = true;
  entry.node.classList.add("is-saved");
  entry.node.querySelector(".saved").textContent = message;
}

async function submit(entry) {
  const scores = {};
  for (const [key] of ASPECTS) scores[key] = Number.parseInt(entry.inputs[key].value, 10);
  const save = entry.node.querySelector(".save");
  save.disabled = true;
  const result = await api("POST", "/api/rate", {
    listener: state.listener, clip: state.clip, stimulus: entry.version.stimulus, scores,
  });
  if (result.status === 201 || result.status === 409) {  // 409: saved before (e.g. from another tab)
    markSaved(entry, result.status === 201 ? "Saved." : "Already saved earlier.");
    $("status").textContent = `Version ${entry.version.label} saved.`;
  } else {
    save.disabled = false;
    $("status").textContent = `Not saved: ${result.payload.error || `server answered ${result.status}`}. Please try again.`;
  }
  updateNext();
}

function updateNext() {
  const left = state.versions.filter((entry) => !entry.saved).length;
  $("next").disabled = left > 0;
  if (left === 0) $("status").textContent = "All versions of this clip are saved. Continue with the next clip.";
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", start);
  $("next").addEventListener("click", loadNext);
  try {
    const remembered = localStorage.getItem(STORAGE_KEY);
    if (remembered) $("listener").value = remembered;
  } catch (error) { /* storage blocked: the listener types the ID */ }
  $("listener").focus();
});
