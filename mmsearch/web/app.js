// mmsearch web page: plain DOM, no framework. Every piece of indexed text (file names, captions,
// transcripts) is put on the page with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const statusLine = $("status");
const results = $("results");
const player = $("player");

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function clock(seconds) {
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${r}` : `${m}:${r}`;
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function chosenTarget(mode) {
  const t = $("target").value;
  if (t !== "auto") return t;
  return mode === "image" ? "texts" : "images";
}

function chosenK() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), 200) : 12;
}

function chosenMode() {
  const checked = document.querySelector('input[name="mode"]:checked');
  return checked ? checked.value : "hybrid";
}

// Several terms or patterns in one field, separated by commas; each becomes one repeated parameter.
function listOf(id) {
  return $(id).value.split(",").map((s) => s.trim()).filter(Boolean);
}

// Filter parameters of the HTTP API and the fields that hold them ([name, field ids, several values]).
const FILTER_FIELDS = [
  ["path", ["f-path"], true],
  ["ext", ["f-ext"], true],
  ["kind", ["f-kind-image", "f-kind-audio", "f-kind-video"], false],
  ["after", ["f-after"], false],
  ["before", ["f-before"], false],
  ["min_duration", ["f-min-duration"], false],
  ["max_duration", ["f-max-duration"], false],
  ["tag", ["f-tag"], true],
  ["taken_after", ["f-taken-after"], false],
  ["taken_before", ["f-taken-before"], false],
  ["near", ["f-near"], false],
];

// [name, value] pairs of the filters set on the page, in the API's parameter names.
function filterPairs() {
  const pairs = [];
  for (const [name, ids, several] of FILTER_FIELDS) {
    for (const id of ids) {
      const field = $(id);
      if (field.type === "checkbox") {
        if (field.checked) pairs.push([name, field.value]);
      } else if (several) {
        for (const value of listOf(id)) pairs.push([name, value]);
      } else if (field.value.trim()) {
        pairs.push([name, field.value.trim()]);
      }
    }
  }
  return pairs;
}

function showFilterCount() {
  const names = new Set(filterPairs().map(([name]) => name));
  $("filter-count").textContent = names.size ? `(${names.size} set)` : "";
}

function clearFilters() {
  for (const [, ids] of FILTER_FIELDS) {
    for (const id of ids) {
      const field = $(id);
      if (field.type === "checkbox") field.checked = false;
      else field.value = "";
    }
  }
  showFilterCount();
}

// The parameters every search sends (GET /api/search, and the query string of the upload POSTs).
function searchParams(kind, first = {}) {
  const params = new URLSearchParams({ ...first, target: chosenTarget(kind), k: chosenK(), mode: chosenMode() });
  for (const term of listOf("add")) params.append("add", term);
  for (const term of listOf("subtract")) params.append("subtract", term);
  for (const [name, value] of filterPairs()) params.append(name, value);
  return params;
}

async function call(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error(`the server did not answer (${e.message})`);
  }
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return body;
}

async function run(label, request) {
  setStatus(`${label}…`);
  document.body.classList.add("busy");
  try {
    const data = await request();
    render(data);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    document.body.classList.remove("busy");
    // A counter scripts (and the browser tests) can wait on: each finished search bumps it.
    document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
  }
}

// A text query, or (with an empty box) a query made of the "more like" terms alone.
function searchText(query) {
  const params = searchParams("text", query ? { q: query } : {});
  $("query-preview").hidden = true;
  const said = query || listOf("add").join(", ");
  return run(`searching for “${said}”`, () => call(`/api/search?${params}`));
}

function searchFile(kind, file, name) {
  const form = new FormData();
  form.append("file", file, name || file.name || kind);
  const params = searchParams(kind);
  const label = kind === "image" ? "searching with the image" : "listening and searching";
  return run(label, () => call(`/api/search/${kind}?${params}`, { method: "POST", body: form }));
}

function showQueryImage(file) {
  const img = $("query-image");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  $("query-preview").hidden = false;
}

function playFrom(src, start) {
  pauseAllBut(player);
  player.hidden = false;
  const seekAndPlay = () => {
    player.currentTime = start || 0;
    player.play().catch((e) => setStatus(`cannot play: ${e.message}`, true));
  };
  if (player.dataset.src !== src) {
    player.dataset.src = src;
    player.src = src;
    player.addEventListener("loadedmetadata", seekAndPlay, { once: true });
    player.load();
  } else {
    seekAndPlay();
  }
}

// One thing plays at a time: the audio player or one card's video.
function pauseAllBut(playing) {
  for (const media of document.querySelectorAll("audio, video")) if (media !== playing) media.pause();
}

// A time as a media fragment's value: seconds, at most millisecond precision, never negative.
function fragmentTime(seconds) {
  return String(Math.max(0, Math.round((Number(seconds) || 0) * 1000) / 1000));
}

// The <video> of a card, made on first use in place of its keyframe thumbnail, seeked to `start` and played.
// The media fragment (#t=) starts the first load at that moment; later seeks set currentTime.
function playVideoAt(node, hit, start) {
  const frame = node.querySelector(".frame");
  let video = frame.querySelector("video");
  const seekAndPlay = () => {
    if (Math.abs(video.currentTime - start) > 0.05) video.currentTime = start;
    pauseAllBut(video);
    video.play().catch((e) => setStatus(`cannot play ${hit.name}: ${e.message}`, true));
  };
  node.querySelectorAll(".moments button").forEach((b) => b.classList.toggle("current", Number(b.dataset.start) === start));
  if (!video) {
    video = el("video", { controls: "", preload: "metadata", playsinline: "", title: hit.path });
    video.addEventListener("play", () => pauseAllBut(video));
    video.addEventListener("error", () => {
      setStatus(`this browser cannot play ${hit.name}: open it with “open file”`, true);
    });
    video.addEventListener("loadedmetadata", seekAndPlay, { once: true });
    video.src = `${hit.media}#t=${fragmentTime(start)}`;
    frame.replaceChildren(video);
    node.classList.add("playing");
    return;
  }
  if (video.readyState >= HTMLMediaElement.HAVE_METADATA) seekAndPlay();
  else video.addEventListener("loadedmetadata", seekAndPlay, { once: true });
}

// A video hit: the keyframe on screen at its moment, with that time; a click plays the video from there.
// The other moments of the video found by the query are listed as times that seek its player.
function videoCard(node, hit) {
  const start = typeof hit.start === "number" ? hit.start : 0;
  const frame = el("div", { class: "frame" });
  const button = el("button", { type: "button", class: "moment-thumb", title: `play ${hit.name} from ${clock(start)}` });
  if (hit.thumb) {
    const img = el("img", { src: hit.thumb, alt: `${hit.name} at ${clock(start)}`, loading: "lazy" });
    img.addEventListener("error", () => img.replaceWith(el("span", { class: "no-thumb", text: "no preview" })), { once: true });
    button.append(img);
  }
  button.append(el("span", { class: "at", text: `▶ ${clock(start)}` }));
  button.addEventListener("click", () => playVideoAt(node, hit, start));
  frame.append(button);
  node.append(frame, el("a", { class: "open", href: hit.media, target: "_blank", rel: "noopener", text: "open file" }));
  const moments = Array.isArray(hit.moments) ? hit.moments.filter((m) => typeof m.start === "number") : [];
  if (moments.length) {
    const list = el("div", { class: "moments", title: "other moments of this video" }, el("span", { class: "muted", text: "also at" }));
    for (const moment of [...moments].sort((a, b) => a.start - b.start)) {
      const what = moment.kind === "segment" ? "said" : "seen";
      const b = el("button", {
        type: "button",
        class: `moment ${moment.kind}`,
        "data-start": String(moment.start),
        title: `${what} at ${clock(moment.start)} (score ${Number(moment.score).toFixed(3)})`,
        text: clock(moment.start),
      });
      b.addEventListener("click", () => playVideoAt(node, hit, moment.start));
      list.append(b);
    }
    node.append(list);
  }
}

// The modes of the switch, and how a hit was found (its `matched`), in the switch's words.
const MODE_LABELS = { hybrid: "words + meaning", vector: "meaning", words: "words" };
const MATCHED_LABELS = { words: "words", vector: "meaning", both: "words + meaning" };

function confidence(hit) {
  if (typeof hit.confidence !== "number") return null;
  return el("span", { class: "confidence", title: "calibrated confidence", text: `${Math.round(hit.confidence * 100)}%` });
}

function matchedBy(hit) {
  if (!Object.hasOwn(MATCHED_LABELS, hit.matched)) return null;
  const label = MATCHED_LABELS[hit.matched];
  return el("span", { class: `matched-by ${hit.matched}`, title: "matched by", text: label });
}

function card(hit) {
  const node = el("article", { class: `card ${hit.file_kind}`, "data-file-id": String(hit.file_id) });
  if (hit.file_kind === "image") {
    const link = el("a", { href: hit.media, target: "_blank", rel: "noopener", title: hit.path });
    link.append(el("img", { src: hit.thumb, alt: hit.name, loading: "lazy" }));
    node.append(link);
  } else if (hit.file_kind === "video") {
    videoCard(node, hit);
  } else {
    const when = hit.start !== null ? `${clock(hit.start)}–${clock(hit.end)}` : "";
    const button = el("button", { type: "button", class: "play", text: `▶ ${when}` });
    button.addEventListener("click", () => playFrom(hit.media, hit.start));
    node.append(button);
  }
  node.append(
    el("div", { class: "meta" },
      el("span", { class: "rank", text: `#${hit.rank}` }),
      el("span", { class: "score", title: "raw score", text: hit.score.toFixed(3) }),
      confidence(hit),
      matchedBy(hit),
      el("span", { class: "kind", text: hit.kind })),
    el("div", { class: "name", title: hit.path, text: hit.name }),
  );
  if (hit.kind === "segment") {
    node.append(el("p", { class: "transcript", text: hit.text || "" }));
  } else if (hit.kind === "caption") {
    node.append(el("p", { class: "caption matched", text: hit.text || "" }));
  } else {
    for (const caption of hit.captions.slice(0, 2)) node.append(el("p", { class: "caption", text: caption }));
  }
  return node;
}

function render(data) {
  const noMatch = data.no_match === true;
  results.replaceChildren(...data.hits.map(card));
  results.classList.toggle("weak", noMatch);
  $("no-match").hidden = !noMatch;
  $("closest").hidden = !(noMatch && data.hits.length > 0);
  const how = Object.hasOwn(MODE_LABELS, data.mode) ? `${data.target}, by ${MODE_LABELS[data.mode]}` : data.target;
  const parts = [`${data.hits.length} result${data.hits.length === 1 ? "" : "s"} (${how}) in ${Math.round(data.took_ms)} ms`];
  if (data.transcript !== undefined && data.transcript !== null) parts.unshift(`heard “${data.transcript}”`);
  setStatus(parts.join(" — "));
}

// --- recording ---------------------------------------------------------------------------------------
let recorder = null;

async function toggleRecording() {
  const button = $("record");
  if (recorder) {
    recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    setStatus("this browser cannot record audio here (it needs http://localhost or https)", true);
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    setStatus(`no microphone: ${e.message}`, true);
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.addEventListener("dataavailable", (event) => { if (event.data.size) chunks.push(event.data); });
  recorder.addEventListener("stop", () => {
    stream.getTracks().forEach((t) => t.stop());
    recorder = null;
    button.textContent = "● record";
    button.classList.remove("recording");
    const type = chunks.length ? chunks[0].type : "audio/webm";
    const ext = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
    searchFile("audio", new Blob(chunks, { type }), `recording.${ext}`);
  });
  recorder.start();
  button.textContent = "■ stop";
  button.classList.add("recording");
  setStatus("recording… press stop when done");
}

// --- wiring ------------------------------------------------------------------------------------------
function pickImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image`, true);
    return;
  }
  showQueryImage(file);
  searchFile("image", file);
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("q").value.trim();
  if (query || listOf("add").length) searchText(query);
  else setStatus("type what you are looking for (or a “more like” term)", true);
});
$("image-file").addEventListener("change", (event) => { pickImage(event.target.files[0]); event.target.value = ""; });
$("audio-file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) searchFile("audio", file);
  event.target.value = "";
});
$("record").addEventListener("click", toggleRecording);
$("filters").addEventListener("input", showFilterCount);
$("clear-filters").addEventListener("click", clearFilters);
showFilterCount();  // a reload may keep the fields' values

const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  pickImage(event.dataTransfer.files[0]);
});

call("/api/stats").then((s) => {
  const files = Object.entries(s.files).map(([k, n]) => `${n} ${k.replace("_", " ")}`).join(", ");
  $("stats").textContent = `${s.model.name} · ${files || "empty index"}`;
}).catch((e) => setStatus(e.message, true));
