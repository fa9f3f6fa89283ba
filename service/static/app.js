// convq's page: pick or upload a model, choose an image, run a job, show every layer's maps.
// Talks only to convq's own API (V2 routes plus /ui/*); no libraries, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { meta: null, image: null, imageName: "", job: null };

function apiKey() { return $("api-key").value.trim(); }

// fetch with the bearer key; throws Error(message) with the API's {"error"} on a non-2xx answer.
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("Authorization", "Bearer " + apiKey());
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function imageUrl(path) {
  return URL.createObjectURL(await (await api(path)).blob());
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function fmt(n) { return typeof n === "number" ? n.toLocaleString("en-US") : String(n ?? ""); }
function shape(s) { return Array.isArray(s) ? s.join("×") : String(s ?? ""); }

async function loadModels(prefer) {
  const select = $("model-select");
  try {
    const models = await (await api("/v2/repository/index", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    })).json();
    select.replaceChildren();
    for (const m of models) {
      const option = new Option(`${m.name} (v${m.version})`, m.name);
      select.add(option);
    }
    const names = models.map((m) => m.name);
    const choice = [prefer, select.dataset.current, "demo"].find((n) => n && names.includes(n));
    if (choice) select.value = choice;
    $("add-demo").hidden = names.includes("demo");
    if (!models.length) setStatus("No models yet: add the demo or upload one above.");
    await showModel();
  } catch (err) {
    setStatus("Could not list models: " + err.message, true);
  }
}

async function showModel() {
  const name = $("model-select").value;
  $("model-select").dataset.current = name;
  state.meta = null;
  $("summary").hidden = true;
  $("filters").hidden = true;
  updateRunButton();
  if (!name) return;
  try {
    state.meta = await (await api(`/v2/models/${encodeURIComponent(name)}`)).json();
  } catch (err) {
    setStatus(`Model ${name}: ${err.message}`, true);
    return;
  }
  const body = $("summary").tBodies[0];
  body.replaceChildren();
  for (const row of state.meta.summary || []) {
    const tr = body.insertRow();
    const rf = Array.isArray(row.receptive_field) ? row.receptive_field.join("×") : row.receptive_field;
    const from = (row.inputs || []).join(", ");
    for (const cell of [row.name, row.type, from, shape(row.output_shape), fmt(row.params), fmt(row.flops), rf]) {
      tr.insertCell().textContent = cell ?? "";
    }
  }
  $("summary").hidden = !(state.meta.summary || []).length;
  try {
    const url = `/ui/models/${encodeURIComponent(name)}/filters.png`;
    const response = await api(url);
    $("filters-img").src = URL.createObjectURL(await response.blob());
    $("filters-caption").textContent =
      `Filters of ${response.headers.get("X-Convq-Layer") || "the first conv layer"}, ` +
      "each scaled to its own range; grey is zero.";
    $("filters").hidden = false;
  } catch (_) {
    $("filters").hidden = true;  // a model without a conv layer has no filters to draw
  }
  await fitImage();
  updateRunButton();
}

async function uploadModel(event) {
  event.preventDefault();
  const name = $("upload-name").value.trim();
  const weights = $("upload-weights").files[0];
  const spec = $("upload-spec").files[0];
  const form = new FormData();
  if (spec) form.append("spec", spec, spec.name);
  form.append("weights", weights, weights.name);
  $("upload-status").textContent = "Uploading…";
  $("upload-status").className = "note";
  try {
    const answer = await (await api(`/v2/repository/models/${encodeURIComponent(name)}/load`,
                                    { method: "POST", body: form })).json();
    $("upload-status").textContent = `Loaded ${name}` + (answer.version ? ` v${answer.version}` : "");
    await loadModels(name);
  } catch (err) {
    $("upload-status").textContent = err.message;
    $("upload-status").className = "error";
  }
}

// Upload the server's own demo files (AlexNet conv1 -> ReLU -> maxpool) as the model "demo".
async function addDemo() {
  $("add-demo").disabled = true;
  try {
    const form = new FormData();
    for (const name of ["spec.json", "weights.npz"]) {
      const blob = await (await api(`/ui/demo/${name}`)).blob();
      form.append(name === "spec.json" ? "spec" : "weights", blob, name);
    }
    await api("/v2/repository/models/demo/load", { method: "POST", body: form });
    setStatus("Added the demo model.");
    await loadModels("demo");
  } catch (err) {
    setStatus("Could not add the demo: " + err.message, true);
  } finally {
    $("add-demo").disabled = false;
  }
}

// The declared input size of the chosen model, or null when it takes any size.
function inputSize() {
  const input = state.meta && (state.meta.inputs || [])[0];
  if (!input || !Array.isArray(input.shape)) return null;
  const [, h, w] = input.shape;
  return h > 0 && w > 0 ? { h, w } : null;
}

// Scale and centre-crop the chosen picture to the model's input size, as a PNG blob.
async function fitImage() {
  if (!state.original) return;
  const bitmap = await createImageBitmap(state.original);
  const size = inputSize() || { h: bitmap.height, w: bitmap.width };
  const canvas = document.createElement("canvas");
  canvas.width = size.w;
  canvas.height = size.h;
  const scale = Math.max(size.w / bitmap.width, size.h / bitmap.height);
  const dw = bitmap.width * scale, dh = bitmap.height * scale;
  canvas.getContext("2d").drawImage(bitmap, (size.w - dw) / 2, (size.h - dh) / 2, dw, dh);
  state.image = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  $("preview").src = URL.createObjectURL(state.image);
  $("preview").hidden = false;
  const resized = bitmap.width !== size.w || bitmap.height !== size.h;
  $("image-note").textContent = `${state.imageName}: ${bitmap.width}×${bitmap.height}` +
    (resized ? `, scaled and cropped to the model's ${size.w}×${size.h}` : "");
  updateRunButton();
}

async function chooseImage(blob, name) {
  state.original = blob;
  state.imageName = name;
  try {
    await fitImage();
  } catch (_) {
    state.original = state.image = null;
    $("preview").hidden = true;
    $("image-note").textContent = `${name} is not a picture this browser can read`;
    updateRunButton();
  }
}

async function loadSamples() {
  try {
    const { samples } = await (await fetch("/ui/samples")).json();
    for (const sample of samples) {
      const button = document.createElement("button");
      button.type = "button";
      button.title = sample.name;
      button.dataset.name = sample.name;
      const img = document.createElement("img");
      img.src = sample.url;
      img.alt = sample.name;
      button.append(img);
      button.addEventListener("click", async () => {
        for (const b of $("samples").children) b.classList.toggle("chosen", b === button);
        await chooseImage(await (await fetch(sample.url)).blob(), sample.name);
      });
      $("samples").append(button);
    }
  } catch (_) { /* samples are a convenience */ }
}

function updateRunButton() {
  $("run-button").disabled = !(state.meta && state.image);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function run() {
  const model = state.meta.name;
  $("run-button").disabled = true;
  $("maps").replaceChildren();
  $("top5").hidden = true;
  $("progress").hidden = false;
  $("progress").value = 0;
  const form = new FormData();
  form.append("images", state.image, state.imageName.replace(/\.\w+$/, "") + ".png");
  form.append("outputs", "all");
  const lean = leanField($("result-kind").value);
  if (lean) form.append("lean", JSON.stringify(lean));
  try {
    const { id } = await (await api(`/v2/models/${encodeURIComponent(model)}/jobs`,
                                    { method: "POST", body: form })).json();
    state.job = id;
    setStatus(`Job ${id} queued`);
    const status = await waitFor(id);
    if (status.status !== "finished") {
      setStatus(`Job ${id} ${status.status}: ${status.error || ""}`, true);
      return;
    }
    $("progress").value = 1;
    const seconds = status.timings && status.timings.compute_seconds;
    setStatus(`Job ${id} finished` + (seconds != null ? ` in ${seconds.toFixed(2)} s` : ""));
    await showMaps(id, status.outputs || state.meta.outputs.map((o) => o.name));
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    updateRunButton();
  }
}

// What the job stores (the lean form field). The page shows grids, so by default the worker
// draws them and stores only the PNGs, a fraction of the float32 maps' bytes; the last layer
// stays numbers (float16) when the model has labels to rank for the top 5.
function leanField(kind) {
  if (kind === "float32") return null;
  if (kind === "float16") return { "*": { dtype: "float16" } };
  const lean = { "*": { png: true } };
  const outputs = state.meta.outputs || [];
  if ((state.meta.labels || []).length && outputs.length) {
    lean[outputs[outputs.length - 1].name] = { dtype: "float16" };
  }
  return lean;
}

async function waitFor(id) {
  for (let delay = 150; ; delay = Math.min(delay * 1.5, 1000)) {
    const status = await (await api(`/v2/jobs/${id}`)).json();
    if (["finished", "failed", "canceled"].includes(status.status)) return status;
    const p = status.progress;
    if (p && p.of) {
      // layer is 1-based and written as that layer starts: the ones before it are done
      $("progress").value = (p.layer - 1) / p.of;
      setStatus(`Job ${id}: layer ${p.layer} of ${p.of} (${p.name})`);
    } else {
      setStatus(`Job ${id} ${status.status}`);
    }
    await sleep(delay);
  }
}

// Layers open with their maps drawn when the model is short; in a long graph (ResNet,
// GoogLeNet) each layer is a closed row, in graph order with its inputs, whose maps are
// fetched when it is opened.
const OPEN_LAYERS = 12;

async function drawMaps(id, name, figure, img) {
  if (img.dataset.loaded) return;
  img.dataset.loaded = "1";
  try {
    img.src = await imageUrl(
      `/v2/jobs/${id}/result?output=${encodeURIComponent(name)}&format=png&image=0`);
  } catch (err) {
    const note = document.createElement("p");
    note.className = "error";
    note.textContent = err.message;
    figure.append(note);
  }
}

async function showTop(id, last) {
  const box = $("top5");
  box.hidden = true;
  if (!(state.meta.labels || []).length) return;
  try {
    const doc = await (await api(
      `/v2/jobs/${id}/result?output=${encodeURIComponent(last)}&format=json&top=5`)).json();
    const list = $("top5-list");
    list.replaceChildren();
    for (const entry of doc.outputs[0].data.slice(0, 5)) {
      const [score, index, ...label] = entry.split(":");
      const li = document.createElement("li");
      li.textContent = `${label.join(":")} (${index}): ${Number(score).toFixed(4)}`;
      list.append(li);
    }
    $("top5-caption").textContent = `Top 5 of ${last}`;
    box.hidden = false;
  } catch (err) {
    setStatus("Could not rank the classes: " + err.message, true);
  }
}

async function showMaps(id, outputs) {
  const shapes = Object.fromEntries((state.meta.outputs || []).map((o) => [o.name, o.shape]));
  const inputs = Object.fromEntries(
    (state.meta.summary || []).map((r) => [r.name, r.inputs || []]));
  const open = outputs.length <= OPEN_LAYERS;
  const pending = [];
  await showTop(id, outputs[outputs.length - 1]);
  for (const name of outputs) {
    const figure = document.createElement("figure");
    figure.className = "layer";
    figure.dataset.layer = name;
    const details = document.createElement("details");
    details.open = open;
    const title = document.createElement("summary");
    const s = shapes[name];
    const from = (inputs[name] || []).length ? ` ← ${inputs[name].join(", ")}` : "";
    title.textContent = (s ? `${name}: ${shape(s.slice(1))}` : name) + from;
    const img = document.createElement("img");
    img.alt = `activation maps of ${name}`;
    img.title = "click a channel to see which pixels made it fire (saliency)";
    img.addEventListener("click", (e) => explainChannel(figure, img, name, s, e));
    details.append(title, img);
    figure.append(details);
    details.addEventListener("toggle", () => { if (details.open) drawMaps(id, name, figure, img); });
    $("maps").append(figure);
    if (open) pending.push(drawMaps(id, name, figure, img));
  }
  await Promise.all(pending);
}

// The channel under a click on a layer's grid (engine tiles: ceil(sqrt(K)) columns, 1 px gaps).
function channelAt(img, s, e) {
  if (!s || s.length < 4) return null;
  const [h, w, k] = s.slice(1).map(Number);
  const cols = Math.ceil(Math.sqrt(k));
  const scale = img.naturalWidth / img.clientWidth;
  const x = Math.floor((e.offsetX * scale) / (w + 1));
  const y = Math.floor((e.offsetY * scale) / (h + 1));
  const channel = y * cols + x;
  return x < cols && channel < k ? channel : null;
}

async function explainChannel(figure, img, layer, s, e) {
  const channel = channelAt(img, s, e);
  if (channel === null || !state.image) return;
  const form = new FormData();
  form.append("images", state.image, state.imageName.replace(/\.\w+$/, "") + ".png");
  form.append("outputs", layer);
  form.append("explain", JSON.stringify({ method: "saliency", layer, channel }));
  setStatus(`Explaining ${layer} channel ${channel}…`);
  try {
    const model = encodeURIComponent(state.meta.name);
    const { id } = await (await api(`/v2/models/${model}/jobs`, { method: "POST", body: form })).json();
    const status = await waitFor(id);
    if (status.status !== "finished") throw new Error(status.error || status.status);
    let overlay = figure.querySelector("img.overlay");
    if (!overlay) {
      overlay = document.createElement("img");
      overlay.className = "overlay";
      figure.append(overlay);
    }
    overlay.alt = `saliency of ${layer} channel ${channel}`;
    overlay.src = await imageUrl(`/v2/jobs/${id}/result?output=explain:overlay&format=png&image=0`);
    setStatus(`${layer} channel ${channel}: saliency over the image`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

function wireDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) await chooseImage(file, file.name);
  });
  $("file-input").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (file) await chooseImage(file, file.name);
  });
}

function main() {
  $("api-key").value = sessionStorage.getItem("convq-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("convq-key", apiKey());
    loadModels();
  });
  $("model-select").addEventListener("change", showModel);
  $("refresh-models").addEventListener("click", () => loadModels());
  $("add-demo").addEventListener("click", addDemo);
  $("upload-form").addEventListener("submit", uploadModel);
  $("run-button").addEventListener("click", run);
  wireDropZone();
  loadSamples();
  loadModels();
}

main();
