// The falcon-serve playground: chat over /v1/chat/completions (SSE), a live view of /metrics.
// Model output only ever goes into the page as text (textContent), never as HTML. URLs are relative,
// so the page also works behind a reverse proxy that serves it under a path prefix.
"use strict";

const KEY_STORAGE = "falcon-serve-api-key";  // sessionStorage: gone when the tab closes
const METRICS_PERIOD_MS = 1000;
const CHART_POINTS = 60;

const $ = (id) => document.getElementById(id);
const conversation = [];  // the turns so far: {role, content}
let controller = null;  // AbortController of the reply being streamed

class ApiError extends Error {}

// ---------------------------------------------------------------- API access

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...options.headers } });
  if (response.status === 401) {
    askForKey(sessionStorage.getItem(KEY_STORAGE) ? "The server refused this key." : "");
  }
  if (!response.ok) {
    throw new ApiError(await errorMessage(response));
  }
  return response;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

// ---------------------------------------------------------------- API key

function askForKey(error) {
  $("key-error").textContent = error;
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-dialog").close();
  loadModels();
});

// ---------------------------------------------------------------- models

async function loadModels() {
  let models;
  try {
    models = (await (await api("v1/models")).json()).data;
  } catch (e) {
    $("server-status").textContent = e.message;
    if (!$("key-dialog").open) setTimeout(loadModels, 2000);  // e.g. 503 while the model loads
    return;
  }
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  if (models.some((m) => m.id === previous)) select.value = previous;
  $("server-status").textContent = models.length
    ? `max_model_len ${models[0].max_model_len}` : "no models";
}

// ---------------------------------------------------------------- chat

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  const stats = document.createElement("div");
  stats.className = "stats";
  box.append(label, content, stats);
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return { box, content, stats };
}

// The field's number, or undefined when it is empty; an error for text that is not one.
function numberField(id, integer = false) {
  const input = $(id);
  const raw = input.value.trim();
  const value = integer && !/^-?\d+$/.test(raw) ? NaN : Number(raw);
  if (input.validity.badInput || (raw !== "" && !Number.isFinite(value))) {  // badInput: the browser says ""
    throw new ApiError(`${id} must be ${integer ? "an integer" : "a number"}`);
  }
  return raw === "" ? undefined : value;
}

function requestBody(messages) {
  const body = {
    model: $("model").value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberField("temperature"),
    top_p: numberField("top_p"),
    max_tokens: numberField("max_tokens", true),
    seed: numberField("seed", true),
  };
  const stop = $("stop-strings").value.split("\n").filter((s) => s !== "");
  if (stop.length) body.stop = stop;
  return body;  // undefined fields are left out by JSON.stringify: the server's defaults apply
}

// Yields the JSON payload of each `data:` line of a server-sent event stream, until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();  // an incomplete line waits for the next read
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function formatStats(s) {
  const parts = [];
  if (s.ttft !== null) parts.push(`TTFT ${Math.round(s.ttft)} ms`);
  if (s.usage) {
    const tokens = s.usage.completion_tokens;
    if (tokens > 1 && s.last > s.first) parts.push(`${((tokens - 1) / ((s.last - s.first) / 1000)).toFixed(1)} tokens/s`);
    parts.push(`${s.usage.prompt_tokens} prompt + ${tokens} completion = ${s.usage.total_tokens} tokens`);
  }
  if (s.finishReason) parts.push(`finish: ${s.finishReason}`);
  return parts.join(" · ");
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation, { role: "user", content: text });

  let body;
  try {
    body = requestBody(messages);
  } catch (e) {  // a bad setting: the message stays in the box, to send once it is fixed
    addMessage("error", e.message).box.classList.add("error");
    return;
  }
  $("prompt").value = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.box.dataset.state = "streaming";
  const stats = { ttft: null, first: null, last: null, usage: null, finishReason: null };
  const start = performance.now();
  controller = new AbortController();
  setStreaming(true);
  try {
    const response = await api("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new ApiError(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      const delta = choice && choice.delta && choice.delta.content;
      if (delta) {
        const now = performance.now();
        if (stats.first === null) { stats.first = now; stats.ttft = now - start; }
        stats.last = now;
        reply.content.textContent += delta;
        reply.box.scrollIntoView({ block: "end" });
      }
      if (choice && choice.finish_reason) stats.finishReason = choice.finish_reason;
      if (chunk.usage) stats.usage = chunk.usage;
      reply.stats.textContent = formatStats(stats);
    }
    reply.box.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      stats.finishReason = "stopped";
      reply.box.dataset.state = "stopped";
    } else {
      reply.box.classList.add("error");
      reply.box.dataset.state = "error";
      reply.content.textContent += (reply.content.textContent ? "\n" : "") + e.message;
    }
  } finally {
    controller = null;
    setStreaming(false);
  }
  reply.stats.textContent = formatStats(stats);
  if (reply.box.dataset.state !== "error") conversation.push({ role: "assistant", content: reply.content.textContent });
  else conversation.pop();  // a failed turn is not part of the conversation
}

function setStreaming(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
});

// ---------------------------------------------------------------- live server view

// Prometheus text format: `name{label="v",...} value [timestamp]`; samples of one name are summed.
function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    const m = /^([a-zA-Z_:][\w:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)/.exec(line);
    if (m) values[m[1]] = (values[m[1]] || 0) + Number(m[3]);
  }
  return values;
}

const throughput = [];  // generated tokens/s, one point per poll
let previous = null;

async function pollMetrics() {
  try {
    const response = await fetch("metrics", { headers: authHeaders() });
    if (response.ok) showMetrics(parseMetrics(await response.text()), performance.now());
  } catch (_) { /* the server is away; try again later */ }
  setTimeout(pollMetrics, METRICS_PERIOD_MS);
}

function showMetrics(m, now) {
  const p = "falcon_serve:";
  const percent = (v) => (v === undefined ? "–" : `${(100 * v).toFixed(1)} %`);
  $("metric-running").textContent = m[p + "num_requests_running"] ?? "–";
  $("metric-waiting").textContent = m[p + "num_requests_waiting"] ?? "–";
  $("metric-kv").textContent = percent(m[p + "kv_cache_usage_perc"]);
  $("metric-slots").textContent = percent(m[p + "state_slots_usage_perc"]);
  const generated = m[p + "generation_tokens_total"] ?? 0;
  if (previous) {
    const rate = Math.max(0, (generated - previous.generated) / ((now - previous.now) / 1000));
    throughput.push(rate);
    if (throughput.length > CHART_POINTS) throughput.shift();
    $("metric-throughput").textContent = `${rate.toFixed(1)} tokens/s`;
    drawChart($("throughput-chart"), throughput);
  }
  previous = { generated, now };
}

function drawChart(canvas, points) {
  const scale = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * scale;
  canvas.height = height * scale;
  const ctx = canvas.getContext("2d");
  ctx.scale(scale, scale);
  ctx.clearRect(0, 0, width, height);
  const top = Math.max(1, ...points);
  const x = (i) => width - ((points.length - 1 - i) / (CHART_POINTS - 1)) * width;  // newest at the right
  const y = (v) => height - 4 - (v / top) * (height - 18);
  ctx.beginPath();
  points.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  ctx.strokeStyle = "#2a6fb0";
  ctx.lineWidth = 1.5;
  ctx.stroke();
  ctx.fillStyle = "#2a6fb0";
  ctx.fillRect(x(points.length - 1) - 3, y(points[points.length - 1]) - 1.5, 3, 3);  // the latest value
  ctx.fillStyle = "#555";
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillText(`max ${top.toFixed(0)} tokens/s, last ${CHART_POINTS} s`, 4, 11);
}

loadModels();
pollMetrics();
