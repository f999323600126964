/* The service's web page: plain JavaScript, no build step, no dependencies.
 *
 * Four panels, each talking to one endpoint:
 *   generate  POST /generate/stream  Server-Sent Events read through fetch (EventSource cannot POST);
 *                                    class_label + guidance_scale when the model has a guidance classifier
 *   steer     POST /generate/stream  the same stream from a drawing: init_image + strength (SDEdit) or
 *                                    init_image + mask (RePaint)
 *   forward   GET /noise, POST /noise  x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε   (DDPM eq. 4)
 *   reverse   POST /denoise-step       x_{t−1} = μ̃_t(x_t, x̂_0) + σ_t z          (DDPM eqs. 6, 7, 15)
 * Controls for a conditioning the picked model lacks (GET /v1/model `conditioning`) are hidden.
 * Errors (422 validation, 429 queue full, 503 not ready, …) are shown in the panel that caused them.
 * API keys: every call sends `Authorization: Bearer <key>` once one is known; a 401 opens the key prompt.
 * The key lives in sessionStorage only (this tab, until it closes), never in localStorage or the URL.
 */
"use strict";

const $ = (id) => document.getElementById(id);

/* ------------------------------------------------------------------ helpers */

/** Turn a failed response into a readable message (FastAPI's 422 detail list, Retry-After on 429). */
async function describeError(res) {
  let detail = "";
  try {
    const body = await res.json();
    detail = formatDetail(body.detail ?? body.error ?? body.message ?? body);
  } catch {
    detail = res.statusText;
  }
  if (res.status === 429) {
    const after = res.headers.get("Retry-After");
    return `429 server busy: the queue is full${after ? `, retry in ${after} s` : ""}. ${detail}`.trim();
  }
  if (res.status === 401) return `401 unauthorized: ${detail}`;
  if (res.status === 422) return `422 invalid input: ${detail}`;
  if (res.status === 503) return `503 not ready: ${detail}`;
  return `${res.status} ${detail}`.trim();
}

function formatDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => {
        if (typeof d !== "object" || d === null) return String(d);
        const loc = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body" && p !== "query").join(".") : "";
        return loc ? `${loc}: ${d.msg}` : d.msg ?? JSON.stringify(d);
      })
      .join("; ");
  }
  return JSON.stringify(detail);
}

function showError(el, message) {
  el.textContent = message;
  el.hidden = !message;
}

/* ------------------------------------------------------------- API key */

const KEY_ITEM = "ddpm-api-key";

function apiKey() {
  try {
    return sessionStorage.getItem(KEY_ITEM);
  } catch {
    return null; // storage disabled: the prompt comes back after each 401
  }
}

function withKey(headers = {}, key) {
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

/** The server said 401: show the key prompt, with the server's message when a key was sent (a wrong one). */
function askForKey(message) {
  $("auth").hidden = false;
  showError($("auth-error"), apiKey() ? message : "");
  if (!$("auth-key").value) $("auth-key").focus();
}

function useKey(ev) {
  ev.preventDefault();
  const key = $("auth-key").value.trim();
  if (!key) return;
  try {
    sessionStorage.setItem(KEY_ITEM, key);
  } catch {
    /* not stored: the request below still fails with 401 and the prompt stays */
  }
  $("auth-key").value = "";
  $("auth").hidden = true;
  showError($("auth-error"), "");
  loadModels().then(loadModelInfo).then(showNoise); // what the first 401 left empty
}

/** fetch with the API key that throws an Error carrying the readable message when the status is not 2xx.
 * A 401 for a key replaced while the request was in flight is resent with the new key, so a slow answer to an
 * old, wrong key neither reopens the prompt nor fails what the new key loads. */
async function request(url, options = {}) {
  const key = apiKey();
  const res = await fetch(url, { ...options, headers: withKey(options.headers, key) });
  if (res.status === 401 && apiKey() !== key) return request(url, options);
  if (!res.ok) {
    const err = new Error(await describeError(res));
    err.status = res.status;
    if (res.status === 401) askForKey(err.message);
    throw err;
  }
  return res;
}

function postJSON(url, body, signal) {
  return request(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
}

function intOrNull(input) {
  const v = input.value.trim();
  return v === "" ? null : Number(v);
}

function fmt(x) {
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  return Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? x.toFixed(6) : x.toExponential(4);
}

function setNumbers(dl, pairs) {
  dl.replaceChildren();
  for (const [name, value] of pairs) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = fmt(value);
    dd.dataset.name = name;
    dl.append(dt, dd);
  }
}

const pngSrc = (b64) => `data:image/png;base64,${b64}`;

/* ------------------------------------------------------------ .npy codec */

function b64ToBytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function bytesToB64(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

/** Parse a little-endian float32 (or float64) C-order .npy file: {shape, data: Float32Array}. */
function parseNpy(bytes) {
  const magic = String.fromCharCode(...bytes.subarray(0, 6));
  if (magic !== "\x93NUMPY") throw new Error("not a .npy file");
  const major = bytes[6];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + headerLen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  if (/'fortran_order':\s*True/.test(header)) throw new Error("fortran-order .npy is not supported");
  const shape = /'shape':\s*\(([^)]*)\)/
    .exec(header)[1]
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean)
    .map(Number);
  const body = bytes.slice(start + headerLen); // copy: aligned for the typed array
  let data;
  if (descr === "<f4") data = new Float32Array(body.buffer);
  else if (descr === "<f8") data = Float32Array.from(new Float64Array(body.buffer));
  else throw new Error(`unsupported .npy dtype ${descr}`);
  return { shape, data };
}

/** A float32 array as .npy (version 1.0) bytes. */
function makeNpy(shape, data) {
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(", ");
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${dims}), }`;
  const pad = 64 - ((10 + header.length + 1) % 64);
  header += " ".repeat(pad % 64) + "\n";
  const out = new Uint8Array(10 + header.length + data.length * 4);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  new DataView(out.buffer).setUint16(8, header.length, true);
  for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
  out.set(new Uint8Array(new Float32Array(data).buffer), 10 + header.length);
  return out;
}

/** Draw a (…, C, H, W) array in [-1, 1] (after dividing by `scale`) on a canvas, C = 1 or 3. */
function drawArray(canvas, { shape, data }, scale = 1) {
  const [c, h, w] = shape.slice(-3);
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const plane = h * w;
  const toByte = (v) => Math.max(0, Math.min(255, Math.round((v / scale + 1) * 127.5)));
  for (let p = 0; p < plane; p++) {
    const r = toByte(data[p]);
    const g = c === 3 ? toByte(data[plane + p]) : r;
    const b = c === 3 ? toByte(data[2 * plane + p]) : r;
    img.data.set([r, g, b, 255], 4 * p);
  }
  ctx.putImageData(img, 0, 0);
}

/** Seeded standard normal samples: mulberry32 + Box–Muller. */
function gaussian(n, seed) {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const u1 = Math.max(uniform(), 1e-12);
    const u2 = uniform();
    const r = Math.sqrt(-2 * Math.log(u1));
    out[i] = r * Math.cos(2 * Math.PI * u2);
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
  }
  return out;
}

/* --------------------------------------------------------------- model */

/** Menu labels; a sampler the server lists but this table lacks is shown by its name. */
const SAMPLER_LABELS = {
  dpmpp_2m: "DPM-Solver++ 2M",
  dpmpp_3m: "DPM-Solver++ 3M",
  dpmpp_2m_sde: "DPM-Solver++ 2M SDE",
  unipc: "UniPC",
  ddim: "DDIM",
  ddpm: "DDPM (ancestral)",
};

/** Steps the page suggests instead of the server's default_steps: DDPM-T is slow, DDPM-100 is the respaced sampler. */
const QUICK_STEPS = { ddpm: 100 };

const model = {
  T: 1000,
  channels: 1,
  size: 28,
  maxImages: 16,
  examples: [],
  samplers: Object.keys(SAMPLER_LABELS), // replaced by GET /v1/model's list
  defaultSampler: "", // the sampler a request naming none gets (GET /v1/model); the menus start on it
  defaultSteps: {}, // {sampler: steps}
  maxSteps: {}, // {sampler: steps}
  spacings: {}, // {sampler: [spacing, …]}
  defaultSpacing: {}, // {sampler: spacing}
  resamplingSamplers: [], // the samplers RePaint's resampling (jump_length, jump_n_sample) works with
  conditioning: [], // among "image_to_image", "inpainting", "class_guidance"
  numClasses: null, // class_label is 0..numClasses-1; null: no guidance classifier
  defaultGuidance: null, // guidance_scale the server uses when a class_label request has none
};

/** The model picked in the header (GET /v1/models), or "" for the server's default (one model: no picker shown,
 *  and requests leave `model` out). */
function pickedModel() {
  return $("model-pick").hidden ? "" : $("model-select").value;
}

/** `model=<picked>&` for query strings ("" when the default is used). */
function modelQuery() {
  const name = pickedModel();
  return name ? `model=${encodeURIComponent(name)}&` : "";
}

/** Fill the model menu from GET /v1/models; shown only when the server has more than one model. */
async function loadModels() {
  const select = $("model-select");
  try {
    const listing = await (await request("v1/models")).json();
    const picked = select.value;
    select.replaceChildren();
    for (const m of listing.models) addOption(select, m.name, `${m.name} (${m.image_shape.join("×")})`);
    const names = listing.models.map((m) => m.name);
    select.value = names.includes(picked) ? picked : listing.default;
    $("model-pick").hidden = names.length < 2;
  } catch {
    $("model-pick").hidden = true; // loadModelInfo reports the error
  }
}

/** Another model picked: re-read its info, resize the controls, restart the forward and reverse views. */
async function switchModel() {
  await loadModelInfo();
  uploaded = null;
  $("fwd-upload").value = "";
  $("fwd-clear-upload").hidden = true;
  rev.x = null;
  $("rev-step").disabled = true;
  $("rev-play").disabled = true;
  $("rev-t").textContent = "—";
  $("gen-results").replaceChildren();
  $("steer-results").replaceChildren();
  $("steer-preview").removeAttribute("src");
  showNoise();
}

/** Read GET /v1/model (schemas.ModelResponse) and size the controls to the model. */
async function loadModelInfo() {
  try {
    const info = await (await request(`v1/model?${modelQuery()}`)).json();
    model.T = info.num_train_timesteps;
    [model.channels, model.size] = info.image_shape;
    model.maxImages = info.max_images_per_request;
    model.examples = info.examples ?? [];
    model.samplers = info.samplers ?? model.samplers;
    model.defaultSampler = info.default_sampler ?? "";
    model.defaultSteps = info.default_steps ?? {};
    model.maxSteps = info.max_steps ?? {};
    model.spacings = info.timestep_spacings ?? {};
    model.defaultSpacing = info.default_timestep_spacing ?? {};
    model.resamplingSamplers = info.resampling_samplers ?? [];
    model.conditioning = info.conditioning ?? [];
    model.numClasses = info.num_classes ?? null;
    model.defaultGuidance = info.default_guidance_scale ?? null;
    $("model-info").textContent =
      `${info.name} · ${info.image_shape.join("×")} · T = ${model.T} · ${info.schedule.beta_schedule} β ` +
      `${+info.schedule.beta_start.toPrecision(4)}→${+info.schedule.beta_end.toPrecision(4)} · ${info.variance_type} · ${info.device} ${info.dtype}` +
      ` · sha256 ${info.sha256.slice(0, 12)}…`;
  } catch (err) {
    $("model-info").textContent = `model info unavailable: ${err.message}`;
    model.conditioning = []; // nothing offered that the server was not asked about
  }
  $("gen-num").max = model.maxImages;
  $("steer-num").max = model.maxImages;
  fillSamplerMenu();
  fillSteerSamplerMenu();
  applyConditioning();
  resetCanvases();
  $("fwd-t").max = model.T - 1;
  $("fwd-t").value = Math.min(Number($("fwd-t").value), model.T - 1);
  const select = $("fwd-example");
  select.replaceChildren();
  for (const name of model.examples) {
    const opt = document.createElement("option");
    opt.value = name;
    opt.textContent = name;
    select.append(opt);
  }
  select.disabled = !model.examples.length; // no bundled digits: upload one
  $("steer-example").replaceChildren(...[...select.options].map((o) => o.cloneNode(true)));
  $("steer-example").disabled = $("steer-load-example").disabled = !model.examples.length;
}

/** Show the controls of each conditioning the model supports, hide the others (called on every model switch). */
function applyConditioning() {
  const has = (kind) => model.conditioning.includes(kind);
  const guided = has("class_guidance") && model.numClasses !== null;
  $("gen-class-label").hidden = !guided;
  $("gen-guidance-label").hidden = !guided;
  const classes = $("gen-class");
  classes.replaceChildren();
  addOption(classes, "", "none");
  for (let c = 0; guided && c < model.numClasses; c++) addOption(classes, String(c), String(c));
  classes.value = "";
  classes.disabled = !guided;
  const scale = $("gen-guidance");
  const start = model.defaultGuidance ?? 1;
  scale.max = Math.max(20, Math.ceil(2 * start)); // the server allows up to 100; past ~20 samples degrade
  scale.value = start;
  applyClass();

  $("steer").hidden = !has("image_to_image") && !has("inpainting");
  for (const el of document.querySelectorAll(".img2img-only")) el.hidden = !has("image_to_image");
  for (const el of document.querySelectorAll(".inpaint-only")) el.hidden = !has("inpainting");
  if (!has("inpainting")) {
    document.querySelector('input[name="steer-tool"][value="draw"]').checked = true;
    clearMask();
  }
}

/** The guidance scale matters only with a class picked: enabled then, and its value shown. */
function applyClass() {
  $("gen-guidance").disabled = $("gen-class").disabled || $("gen-class").value === "";
  $("gen-guidance-value").textContent = $("gen-guidance").value;
}

/* ----------------------------------------------- 1. generate (SSE stream) */

function addOption(select, value, label) {
  const opt = document.createElement("option");
  opt.value = value;
  opt.textContent = label;
  select.append(opt);
}

/** The sampler the menus start on: the server's default when it offers it, else its first. */
function startingSampler() {
  return model.samplers.includes(model.defaultSampler) ? model.defaultSampler : model.samplers[0];
}

/** One <option> per sampler the server offers; start on the server's default sampler. */
function fillSamplerMenu() {
  const select = $("gen-sampler");
  select.replaceChildren();
  for (const name of model.samplers) addOption(select, name, SAMPLER_LABELS[name] ?? name);
  select.value = startingSampler();
  applySampler();
}

/** Fit the other controls to the chosen sampler: steps (default and max), η (DDIM only), spacing menu. */
function applySampler() {
  const name = $("gen-sampler").value;
  const steps = $("gen-steps");
  const top = model.maxSteps[name] ?? model.T;
  steps.max = top;
  const suggested = QUICK_STEPS[name] ?? model.defaultSteps[name];
  steps.value = Math.min(suggested ?? Number(steps.value), top);
  $("gen-eta-label").hidden = name !== "ddim";

  // "model default (X)" sends no timestep_spacing; an explicit pick survives a switch if the new sampler has it.
  const spacing = $("gen-spacing");
  const picked = spacing.value;
  const supported = model.spacings[name] ?? [];
  spacing.replaceChildren();
  const fallback = model.defaultSpacing[name];
  addOption(spacing, "", fallback ? `model default (${fallback})` : "model default");
  for (const s of supported) addOption(spacing, s, s);
  spacing.value = supported.includes(picked) ? picked : "";
}

/** Yield {event, data} from a text/event-stream body (the SSE wire format, parsed by hand). */
async function* readSSE(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith(":")) continue; // comment / keep-alive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

function generationBody() {
  const body = {
    ...(pickedModel() ? { model: pickedModel() } : {}),
    num_images: Number($("gen-num").value),
    sampler: $("gen-sampler").value,
    steps: Number($("gen-steps").value),
  };
  const seed = intOrNull($("gen-seed"));
  if (seed !== null) body.seed = seed;
  if (body.sampler === "ddim") body.eta = Number($("gen-eta").value);
  const spacing = $("gen-spacing").value;
  if (spacing) body.timestep_spacing = spacing; // absent: the model's default for this sampler
  const label = $("gen-class").value;
  if (!$("gen-class-label").hidden && label !== "") {
    body.class_label = Number(label); // ε shifted by −s·√(1−ᾱ_t)·∇ₓ log p(y | x_t) (Dhariwal & Nichol eq. 14)
    body.guidance_scale = Number($("gen-guidance").value);
  }
  return body;
}

/** The panels that stream a generation, by id prefix: `${prefix}-progress`, `-progress-text`, `-error`,
 *  `-preview`, `-results`, `-seed-shown`, `-cancel` (and `-reuse-seed` where there is one). */
const STREAM_PANELS = {
  gen: { runs: ["gen-run"], abort: null },
  steer: { runs: ["steer-run-img2img", "steer-run-inpaint"], abort: null },
};

function setProgress(prefix, step, total, text) {
  $(`${prefix}-progress`).max = total || 1;
  $(`${prefix}-progress`).value = step;
  $(`${prefix}-progress-text`).textContent = text ?? `step ${step} / ${total}`;
}

function showResult(prefix, result) {
  const grid = $(`${prefix}-results`);
  grid.replaceChildren();
  for (const b64 of result.images ?? []) {
    const img = document.createElement("img");
    img.className = "pixel result";
    img.alt = "generated image";
    img.src = pngSrc(b64);
    grid.append(img);
  }
  $(`${prefix}-seed-shown`).textContent = `seed ${result.seed}`;
  $(`${prefix}-seed-shown`).dataset.seed = result.seed;
  const reuse = $(`${prefix}-reuse-seed`);
  if (reuse) reuse.hidden = false;
  const progress = $(`${prefix}-progress`);
  const secs = result.total_seconds ?? result.elapsed_s ?? result.duration_s;
  setProgress(
    prefix,
    result.steps ?? progress.max,
    result.steps ?? progress.max,
    `done: ${result.images?.length ?? 0} image(s), ${result.sampler ?? ""}-${result.steps ?? ""}` +
      (result.timestep_spacing ? `, ${result.timestep_spacing} spacing` : "") +
      (secs != null ? ` in ${Number(secs).toFixed(2)} s` : ""),
  );
}

/** POST /generate/stream with `body`; progress, x̂_0 previews, the result and any error go to the panel `prefix`. */
async function streamGeneration(prefix, body) {
  const panel = STREAM_PANELS[prefix];
  showError($(`${prefix}-error`), "");
  panel.abort = new AbortController();
  for (const id of panel.runs) $(id).disabled = true;
  $(`${prefix}-cancel`).disabled = false;
  setProgress(prefix, 0, 1, "queued…");
  try {
    const res = await postJSON("generate/stream", body, panel.abort.signal);
    let finished = false;
    for await (const { event, data } of readSSE(res.body)) {
      const payload = JSON.parse(data);
      if (event === "progress") {
        setProgress(prefix, payload.step, payload.total);
        const preview = payload.preview ?? payload.x0_preview ?? payload.image;
        if (preview) $(`${prefix}-preview`).src = pngSrc(preview);
      } else if (event === "result") {
        showResult(prefix, payload);
        finished = true;
      } else if (event === "error") {
        const status = payload.status ?? payload.status_code;
        throw new Error(`${status ? `${status} ` : ""}${formatDetail(payload.detail ?? payload.message ?? payload)}`);
      }
    }
    if (!finished) throw new Error("the stream ended without a result");
  } catch (err) {
    if (err.name === "AbortError") setProgress(prefix, 0, 1, "cancelled");
    else {
      showError($(`${prefix}-error`), err.message);
      setProgress(prefix, 0, 1, "failed");
    }
  } finally {
    for (const id of panel.runs) $(id).disabled = false;
    $(`${prefix}-cancel`).disabled = true;
    panel.abort = null;
  }
}

function generate(ev) {
  ev.preventDefault();
  return streamGeneration("gen", generationBody());
}

/* ------------------------------------ 2. steer: image-to-image and inpainting */

/** The picture is kept at EXPORT_SCALE × the model's resolution (shown larger still, pixelated) and sent as
 *  that PNG: the server converts it to the model's channels and size (Lanczos), so strokes arrive anti-aliased. */
const EXPORT_SCALE = 4;
const MASK_COLOUR = "rgb(255, 0, 0)"; // painted opaque, shown at half opacity (style.css .mask-overlay)

let stroke = null; // {pointerId, ctx, last: [x, y]} while a pen, finger or mouse button is down

/** Size both canvases to the picked model: black and empty the first time; after a model switch the picture and
 *  the mask are kept, rescaled when the new model's size differs. */
function resetCanvases() {
  const side = model.size * EXPORT_SCALE;
  for (const id of ["steer-canvas", "steer-mask"]) {
    const c = $(id);
    if (c.dataset.sized && c.width === side) continue;
    let old = null;
    if (c.dataset.sized) {
      old = document.createElement("canvas");
      [old.width, old.height] = [c.width, c.height];
      old.getContext("2d").drawImage(c, 0, 0);
    }
    c.width = c.height = side; // clears it
    c.dataset.sized = "true";
    if (id === "steer-canvas") clearPicture();
    if (old) c.getContext("2d").drawImage(old, 0, 0, side, side);
  }
}

function clearPicture() {
  const c = $("steer-canvas");
  const ctx = c.getContext("2d");
  ctx.globalCompositeOperation = "source-over";
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, c.width, c.height);
}

function clearMask() {
  const c = $("steer-mask");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
}

/** Regenerate the lower half: the mask becomes exactly rows h/2 … h−1. */
function maskLowerHalf() {
  clearMask();
  const c = $("steer-mask");
  const ctx = c.getContext("2d");
  ctx.globalCompositeOperation = "source-over";
  ctx.fillStyle = MASK_COLOUR;
  ctx.fillRect(0, c.height / 2, c.width, c.height / 2);
}

function steerTool() {
  return document.querySelector('input[name="steer-tool"]:checked')?.value ?? "draw";
}

/** The pointer's position in canvas pixels (the stack is shown larger than the canvases' resolution). */
function canvasPoint(ev) {
  const box = $("steer-stack").getBoundingClientRect();
  const side = $("steer-canvas").width;
  return [((ev.clientX - box.left) * side) / box.width, ((ev.clientY - box.top) * side) / box.height];
}

/** A pointer went down on the picture: pen = white on the picture; mask brush = red on the overlay; mask
 *  eraser = remove from the overlay. One pointer at a time; a mouse draws with its main button only. */
function startStroke(ev) {
  if (stroke || (ev.pointerType === "mouse" && ev.button !== 0)) return;
  ev.preventDefault();
  const tool = steerTool();
  const ctx = $(tool === "draw" ? "steer-canvas" : "steer-mask").getContext("2d");
  ctx.globalCompositeOperation = tool === "erase" ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = tool === "draw" ? "#fff" : MASK_COLOUR;
  ctx.lineWidth = Number($("steer-brush").value) * EXPORT_SCALE; // the slider counts model pixels
  ctx.lineCap = ctx.lineJoin = "round";
  const [x, y] = canvasPoint(ev);
  ctx.beginPath(); // a dot where it went down
  ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI);
  ctx.fill();
  stroke = { pointerId: ev.pointerId, ctx, last: [x, y] };
  try {
    $("steer-stack").setPointerCapture(ev.pointerId); // keep the stroke when it leaves the canvas
  } catch {
    /* a synthetic pointer without capture: the stroke ends where it leaves */
  }
}

function continueStroke(ev) {
  if (stroke?.pointerId !== ev.pointerId) return;
  ev.preventDefault();
  const { ctx } = stroke;
  for (const e of ev.getCoalescedEvents?.() ?? [ev]) {
    const point = canvasPoint(e);
    ctx.beginPath();
    ctx.moveTo(...stroke.last);
    ctx.lineTo(...point);
    ctx.stroke();
    stroke.last = point;
  }
}

function endStroke(ev) {
  if (stroke?.pointerId === ev.pointerId) stroke = null;
}

/** A canvas as base64 PNG (no `data:` prefix). */
function canvasPNG(canvas) {
  return canvas.toDataURL("image/png").split(",", 2)[1];
}

/** The mask as a white-on-black PNG of the picture's size (white = regenerate: the overlay's alpha as grey),
 *  and whether anything is painted at all. */
function maskPNG() {
  const src = $("steer-mask");
  const { width, height } = src;
  const painted = src.getContext("2d").getImageData(0, 0, width, height).data;
  const out = document.createElement("canvas");
  out.width = width;
  out.height = height;
  const ctx = out.getContext("2d");
  const img = ctx.createImageData(width, height);
  let any = false;
  for (let p = 0; p < width * height; p++) {
    const alpha = painted[4 * p + 3];
    any ||= alpha > 0;
    img.data.set([alpha, alpha, alpha, 255], 4 * p);
  }
  ctx.putImageData(img, 0, 0);
  return { png: canvasPNG(out), painted: any };
}

/** Draw the chosen example digit (GET /noise …&include=x0: x_0 at the model's size) into the picture. */
async function loadExample() {
  showError($("steer-error"), "");
  try {
    const name = encodeURIComponent($("steer-example").value);
    const out = await (await request(`noise?${modelQuery()}image=${name}&t=0&format=json&include=x0`)).json();
    const small = document.createElement("canvas");
    drawArray(small, parseNpy(b64ToBytes(out.x0)));
    const c = $("steer-canvas");
    const ctx = c.getContext("2d");
    ctx.globalCompositeOperation = "source-over";
    ctx.imageSmoothingEnabled = false; // model pixels as EXPORT_SCALE² blocks
    ctx.drawImage(small, 0, 0, c.width, c.height);
    ctx.imageSmoothingEnabled = true;
  } catch (err) {
    showError($("steer-error"), err.message);
  }
}

/** The steer panel's own sampler menu (default steps as the Generate panel's); resampling only where it works. */
function fillSteerSamplerMenu() {
  const select = $("steer-sampler");
  const picked = select.value;
  select.replaceChildren();
  for (const name of model.samplers) addOption(select, name, SAMPLER_LABELS[name] ?? name);
  select.value = model.samplers.includes(picked) ? picked : startingSampler();
  applySteerSampler();
}

function applySteerSampler() {
  const name = $("steer-sampler").value;
  const steps = $("steer-steps");
  const top = model.maxSteps[name] ?? model.T;
  steps.max = top;
  steps.value = Math.min(QUICK_STEPS[name] ?? model.defaultSteps[name] ?? Number(steps.value), top);
  $("steer-resample").hidden = !model.resamplingSamplers.includes(name);
}

/** What both runs send: the picture as init_image, plus the panel's sampler, steps, images and seed. */
function steerBody(fields) {
  const body = {
    ...(pickedModel() ? { model: pickedModel() } : {}),
    num_images: Number($("steer-num").value),
    sampler: $("steer-sampler").value,
    steps: Number($("steer-steps").value),
    init_image: canvasPNG($("steer-canvas")),
    ...fields,
  };
  const seed = intOrNull($("steer-seed"));
  if (seed !== null) body.seed = seed;
  return body;
}

/** SDEdit: the picture noised to the t that strength selects, denoised from there. */
function runImageToImage() {
  return streamGeneration("steer", steerBody({ strength: Number($("steer-strength").value) }));
}

/** RePaint: regenerate the masked pixels from noise, keep the others exactly. */
function runInpaint() {
  const mask = maskPNG();
  if (!mask.painted) {
    showError($("steer-error"), "nothing to regenerate: paint the mask (red) first, or press “mask lower half”");
    return;
  }
  const fields = { mask: mask.png };
  if (!$("steer-resample").hidden) {
    const passes = Number($("steer-jump-n").value);
    if (passes > 1) {
      fields.jump_n_sample = passes;
      fields.jump_length = Number($("steer-jump-length").value);
    }
  }
  return streamGeneration("steer", steerBody(fields));
}

/* ------------------------------------------------- 3. forward process */

let uploaded = null; // a File chosen by the user (sent as the raw body), or null for the bundled example
let fwdSeq = 0; // drop responses that arrive after a newer request

/** x_t of the chosen example (GET /noise) or of the uploaded file (POST /noise, raw body), as JSON. */
async function showNoise() {
  const t = Number($("fwd-t").value);
  $("fwd-t-value").textContent = t;
  const seq = ++fwdSeq;
  const seed = intOrNull($("fwd-seed")) ?? 0;
  try {
    const query = `${modelQuery()}t=${t}&seed=${seed}&format=json`;
    let res;
    if (uploaded) {
      res = await request(`noise?${query}`, {
        method: "POST",
        headers: { "Content-Type": uploaded.type || "application/octet-stream" },
        body: uploaded,
      });
    } else {
      const image = $("fwd-example").value;
      res = await request(`noise?${query}${image ? `&image=${encodeURIComponent(image)}` : ""}`);
    }
    const out = await res.json();
    if (seq !== fwdSeq) return; // a newer slider position is on its way
    const img = $("fwd-image");
    img.src = pngSrc(out.x_t_png[0]);
    img.dataset.t = t;
    showError($("fwd-error"), "");
    const abar = out.alpha_bar[0];
    setNumbers($("fwd-numbers"), [
      ["t", t],
      ["alpha_bar_t", abar],
      ["sqrt(alpha_bar_t)", Math.sqrt(abar)],
      ["sqrt(1 - alpha_bar_t)", Math.sqrt(1 - abar)],
      ["seed", out.seed],
    ]);
  } catch (err) {
    if (seq === fwdSeq) showError($("fwd-error"), err.message);
  }
}

/* ------------------------------------------------- 4. reverse stepping */

const rev = { x: null, t: null, playing: false, busy: false };

function startFromNoise() {
  const shape = [1, model.channels, model.size, model.size];
  const seed = intOrNull($("rev-seed")) ?? 0;
  rev.x = { shape, data: gaussian(shape.reduce((a, b) => a * b), seed) };
  rev.t = model.T - 1;
  drawArray($("rev-xt"), rev.x);
  for (const id of ["rev-x0", "rev-eps"]) {
    const c = $(id);
    c.getContext("2d").clearRect(0, 0, c.width, c.height);
  }
  $("rev-t").textContent = rev.t;
  setNumbers($("rev-numbers"), []);
  showError($("rev-error"), "");
  $("rev-step").disabled = false;
  $("rev-play").disabled = false;
}

/** One call to /denoise-step: x_t → x_{t−1}, drawing x_{t−1}, x̂_0 and ε_θ. */
async function denoiseStep() {
  if (rev.x === null || rev.t < 0) return false;
  const body = {
    ...(pickedModel() ? { model: pickedModel() } : {}),
    x_t: bytesToB64(makeNpy(rev.x.shape, rev.x.data)),
    t: rev.t,
    seed: intOrNull($("rev-seed")) ?? 0, // z at step t: the draw /generate makes for image 0 with this seed
  };
  if ($("rev-variance").value) body.variance = $("rev-variance").value;
  const out = await (await postJSON("denoise-step", body)).json();
  const xPrev = parseNpy(b64ToBytes(out.x_prev));
  rev.x = { shape: xPrev.shape.length === 3 ? [1, ...xPrev.shape] : xPrev.shape, data: xPrev.data };
  const tShown = rev.t;
  rev.t -= 1;
  drawArray($("rev-xt"), rev.x);
  drawArray($("rev-x0"), parseNpy(b64ToBytes(out.x0_pred)));
  drawArray($("rev-eps"), parseNpy(b64ToBytes(out.eps)), 3);
  $("rev-t").textContent = rev.t >= 0 ? rev.t : "0 (done: x_0)";
  setNumbers($("rev-numbers"), [
    ["t", tShown],
    ["alpha_t", out.alpha_t],
    ["alpha_bar_t", out.alpha_bar_t],
    ["alpha_bar_prev", out.alpha_bar_prev],
    ["beta_t", out.beta_t],
    ["posterior_mean_coef_x0", out.posterior_mean_coef_x0],
    ["posterior_mean_coef_xt", out.posterior_mean_coef_xt],
    ["posterior_variance", out.posterior_variance],
    [`sigma^2 (${out.variance})`, out.sigma_squared],
  ]);
  if (rev.t < 0) {
    $("rev-step").disabled = true;
    $("rev-play").disabled = true;
  }
  return rev.t >= 0;
}

/** `steps per frame` calls in a row (fewer if `keepGoing` turns false, e.g. Pause was pressed). */
async function stepFrames(keepGoing = () => true) {
  if (rev.busy) return false;
  rev.busy = true;
  try {
    const stride = Math.max(1, Number($("rev-stride").value) || 1);
    let more = true;
    for (let i = 0; i < stride && more && keepGoing(); i++) more = await denoiseStep();
    showError($("rev-error"), "");
    return more;
  } catch (err) {
    showError($("rev-error"), err.message);
    return false;
  } finally {
    rev.busy = false;
  }
}

async function togglePlay() {
  const button = $("rev-play");
  if (rev.playing) {
    rev.playing = false; // the loop below stops after the step in flight
    button.disabled = true;
    button.textContent = "Pausing…";
    return;
  }
  rev.playing = true;
  button.textContent = "Pause";
  $("rev-step").disabled = true;
  $("rev-start").disabled = true;
  while (rev.playing && (await stepFrames(() => rev.playing))) {
    await new Promise((r) => requestAnimationFrame(r));
  }
  rev.playing = false;
  button.textContent = "Play";
  button.disabled = rev.t < 0;
  $("rev-step").disabled = rev.t < 0;
  $("rev-start").disabled = false;
}

/* ----------------------------------------------------------------- wiring */

function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

async function main() {
  $("auth-form").addEventListener("submit", useKey);
  await loadModels();
  await loadModelInfo();
  $("model-select").addEventListener("change", switchModel);
  $("gen-form").addEventListener("submit", generate);
  $("gen-cancel").addEventListener("click", () => STREAM_PANELS.gen.abort?.abort());
  $("gen-sampler").addEventListener("change", applySampler);
  $("gen-class").addEventListener("change", applyClass);
  $("gen-guidance").addEventListener("input", applyClass);
  $("gen-reuse-seed").addEventListener("click", () => {
    $("gen-seed").value = $("gen-seed-shown").dataset.seed;
  });

  const noiseSoon = debounce(showNoise, 40);
  $("fwd-t").addEventListener("input", () => {
    $("fwd-t-value").textContent = $("fwd-t").value;
    noiseSoon();
  });
  $("fwd-example").addEventListener("change", showNoise);
  $("fwd-seed").addEventListener("change", showNoise);
  $("fwd-upload").addEventListener("change", () => {
    uploaded = $("fwd-upload").files[0] ?? null;
    $("fwd-clear-upload").hidden = uploaded === null;
    showNoise();
  });
  $("fwd-clear-upload").addEventListener("click", () => {
    uploaded = null;
    $("fwd-upload").value = "";
    $("fwd-clear-upload").hidden = true;
    showNoise();
  });
  showNoise();

  const stack = $("steer-stack");
  stack.addEventListener("pointerdown", startStroke);
  stack.addEventListener("pointermove", continueStroke);
  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) stack.addEventListener(type, endStroke);
  $("steer-brush").addEventListener("input", () => {
    $("steer-brush-value").textContent = $("steer-brush").value;
  });
  $("steer-strength").addEventListener("input", () => {
    $("steer-strength-value").textContent = Number($("steer-strength").value).toFixed(2);
  });
  $("steer-clear").addEventListener("click", clearPicture);
  $("steer-load-example").addEventListener("click", loadExample);
  $("steer-mask-lower").addEventListener("click", maskLowerHalf);
  $("steer-mask-clear").addEventListener("click", clearMask);
  $("steer-sampler").addEventListener("change", applySteerSampler);
  $("steer-run-img2img").addEventListener("click", runImageToImage);
  $("steer-run-inpaint").addEventListener("click", runInpaint);
  $("steer-cancel").addEventListener("click", () => STREAM_PANELS.steer.abort?.abort());

  $("rev-start").addEventListener("click", startFromNoise);
  $("rev-step").addEventListener("click", () => stepFrames());
  $("rev-play").addEventListener("click", togglePlay);
  document.body.dataset.ready = "true";
}

main();
