// The page of `charlm export --format web`: reads its model (model.js), fills in the form from the model's sampling
// defaults, writes the text a slice at a time so that it appears as it is drawn, and offers the model to scripts as
// `window.charlm` (its exactness is checked from there: greedy text, log-probabilities, logits, speed).
"use strict";
const $ = (id) => document.getElementById(id);
const META = JSON.parse($("charlm-meta").textContent);
const MAX_LENGTH = 1000000;  // characters one click may write
const SLICE_MS = 30;  // the page writes for this long, then lets the browser draw
let model = null, running = null;

function showError(message) { $("error").textContent = message; $("error").classList.add("shown"); }
function clearError() { $("error").textContent = ""; $("error").classList.remove("shown"); }
function setState(state) { document.body.dataset.state = state; }
const number = (n) => n.toLocaleString("en");

function chip(name, value) {
  const c = document.createElement("span"); c.className = "chip";
  const b = document.createElement("b"); b.textContent = value;
  c.append(`${name} `, b); return c;
}

/** The form's settings, checked; an Error with one sentence for the first that is wrong. */
function settings() {
  const text = (id) => $(id).value.trim();
  const temperature = Number(text("temperature") || "0.8");
  if (!Number.isFinite(temperature) || temperature < 0) throw new Error(`temperature must be a number >= 0 (0 is greedy), got "${text("temperature")}"`);
  const length = Number(text("length") || "500");
  if (!Number.isInteger(length) || length < 1 || length > MAX_LENGTH) throw new Error(`length must be a whole number from 1 to ${number(MAX_LENGTH)}, got "${text("length")}"`);
  let topK = null, topP = null, seed;
  if (text("top-k")) {
    topK = Number(text("top-k"));
    if (!Number.isInteger(topK) || topK < 1) throw new Error(`top-k must be a whole number of at least 1 (or empty: all), got "${text("top-k")}"`);
  }
  if (text("top-p")) {
    topP = Number(text("top-p"));
    if (!(topP > 0 && topP <= 1)) throw new Error(`top-p must be a number above 0 and at most 1 (or empty: off), got "${text("top-p")}"`);
  }
  if (text("seed")) {
    seed = Number(text("seed"));
    if (!Number.isInteger(seed) || seed < 0 || seed > 4294967295) throw new Error(`seed must be a whole number from 0 to 4294967295 (or empty: random), got "${text("seed")}"`);
  } else {
    seed = crypto.getRandomValues(new Uint32Array(1))[0];
  }
  return { temperature, length, topK, topP, seed };
}

function nextTask() {  // yield to the browser (to draw, to take a click) and come back at once
  return new Promise((resolve) => { const channel = new MessageChannel(); channel.port1.onmessage = resolve; channel.port2.postMessage(0); });
}

async function write(event) {
  event.preventDefault();
  if (running) return;
  clearError();
  let options, ids;
  const prime = $("prime").value;
  try {
    options = settings();
    if (!prime) throw new Error("the prime is empty: type at least one character for the model to continue");
    ids = model.encode(prime);
  } catch (err) { showError(err.message); return; }
  document.body.classList.add("wrote");
  const written = $("written");
  $("prime-shown").textContent = prime; written.textContent = "";
  const node = document.createTextNode(""); written.append(node);
  running = { stop: false }; setState("writing");
  $("generate").disabled = true; $("stop").disabled = false;
  const began = performance.now(), steps = charlmContinue(model, ids, options.length, options), out = $("output");
  let count = 0, finished = false;
  try {
    while (!running.stop && !finished) {
      const until = performance.now() + SLICE_MS;
      let chunk = "";
      do {
        const next = steps.next();
        if (next.done) { finished = true; break; }
        chunk += model.vocab[next.value]; count++;
      } while (performance.now() < until);
      const follow = out.scrollHeight - out.scrollTop - out.clientHeight < 40;
      node.appendData(chunk);
      if (follow) out.scrollTop = out.scrollHeight;
      const seconds = (performance.now() - began) / 1000;
      $("status").textContent = `writing… ${number(count)} characters`;
      $("speed").textContent = `${number(Math.round(count / Math.max(seconds, 1e-3)))} characters/s`;
      if (!finished) await nextTask();
    }
    const seconds = (performance.now() - began) / 1000;
    $("status").textContent = `${running.stop ? "stopped after" : "done:"} ${number(count)} characters in ${seconds.toFixed(1)} s (seed ${options.seed})`;
    setState(running.stop ? "stopped" : "done");
  } catch (err) {
    showError(err.message); setState("ready");
  } finally {
    running = null; $("generate").disabled = false; $("stop").disabled = true;
  }
}

async function start() {
  const m = META;
  document.title = m.title;
  $("title").textContent = m.title;
  $("model-info").append(chip("cell", m.cell), chip("size", `${m.num_layers} × ${m.hidden_size}`),
    chip("parameters", number(m.parameters)), chip("vocabulary", `${m.vocab.length} characters`),
    chip("weights", m.weights.dtype));
  $("footer").textContent = `Written by charlm ${m.charlm_version} (charlm export --format web). The model runs in this page: nothing is sent anywhere.`;
  $("prime").value = m.sampling.prime;
  $("temperature").value = String(m.sampling.temperature);
  try {
    const values = await charlmDecodeValues(m.weights, $("charlm-weights").textContent.trim());
    model = new CharlmModel(m, values);
  } catch (err) {
    showError(`the model could not be read: ${err.message}`); $("status").textContent = "not ready"; setState("failed");
    return;
  }
  window.charlm = {
    meta: m,
    /** The continuation of prime (not the prime itself), as text. */
    generate(prime, length, { temperature = 0, topK = null, topP = null, seed = 0 } = {}) {
      const ids = model.encode(prime);
      let text = "";
      for (const id of charlmContinue(model, ids, length, { temperature, topK, topP, seed })) text += model.vocab[id];
      return text;
    },
    logprob(text) { return charlmLogprob(model, model.encode(text, "the text")); },
    /** The scores after each of these ids, from a zero state. */
    logits(ids) { model.reset(); return ids.map((id) => Array.from(model.step(id))); },
    /** The probabilities a draw from these scores uses (the weights of charlmProbabilities, summing to 1). */
    probabilities(logits, temperature, topK = null, topP = null) {
      const p = Array.from(charlmProbabilities(Float64Array.from(logits), temperature, topK, topP));
      const sum = p.reduce((a, b) => a + b, 0);
      return p.map((v) => v / sum);
    },
    /** Characters per second of n greedy steps (the step and the pick, no drawing on the page). */
    benchmark(n) {
      model.reset();
      let id = 0;
      const began = performance.now();
      for (let k = 0; k < n; k++) id = charlmPick(model.step(id), 0, null, null, null);
      return n / ((performance.now() - began) / 1000);
    },
  };
  $("form").addEventListener("submit", write);
  $("stop").addEventListener("click", () => { if (running) running.stop = true; });
  $("generate").disabled = false;
  $("status").textContent = "ready";
  setState("ready");
}

start();
