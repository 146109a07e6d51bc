// charlm's model in plain JavaScript, for the page of `charlm export --format web`: the weights decoded from the
// page, one step per kind of cell (the arithmetic of charlm/cells/*.py, weights in Float32Array, every sum and
// activation in JavaScript's float64), and the choice of the next character as charlm's `pick` makes it
// (charlm/generation/options.py: temperature, then top-k, then top-p). No DOM here: page.js drives it.
"use strict";

const CHARLM_LN_EPS = 1e-5;  // LayerNorm's epsilon, as torch's nn.LayerNorm and charlm's lstm-ln use
const CHARLM_NOT_FINITE = "the model's scores for the next character are not finite numbers (NaN or infinity)";

/** Every float16 bit pattern's value, as a table of 65,536 float32 values. */
function charlmHalfTable() {
  const table = new Float32Array(65536);
  for (let bits = 0; bits < 65536; bits++) {
    const sign = bits & 0x8000 ? -1 : 1, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
    table[bits] = exponent === 0 ? sign * mantissa * 2 ** -24                            // zero, subnormal
      : exponent === 31 ? (mantissa ? NaN : sign * Infinity)
      : sign * (1024 + mantissa) * 2 ** (exponent - 25);                                  // (1 + m / 1024) 2^(e - 15)
  }
  return table;
}

/** The page's values (Float32Array) from its blob: base64, inflated by the browser, byte planes put back together. */
async function charlmDecodeValues(weights, base64) {
  const text = atob(base64), packed = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) packed[i] = text.charCodeAt(i);
  const inflated = new Blob([packed]).stream().pipeThrough(new DecompressionStream(weights.codec));
  const bytes = new Uint8Array(await new Response(inflated).arrayBuffer());
  const n = weights.values, planes = weights.planes;
  if (bytes.length !== n * planes) throw new Error(`the page's weights are damaged (${bytes.length} bytes, expected ${n * planes})`);
  const values = new Float32Array(n);
  if (planes === 2) {  // float16: plane 0 holds every value's low byte, plane 1 its high byte
    const half = charlmHalfTable();
    for (let i = 0; i < n; i++) values[i] = half[bytes[i] | (bytes[n + i] << 8)];
  } else {  // float32 bits, written through a Uint32Array view: right on any byte order
    const bits = new Uint32Array(values.buffer);
    for (let i = 0; i < n; i++) bits[i] = (bytes[i] | (bytes[n + i] << 8) | (bytes[2 * n + i] << 16) | (bytes[3 * n + i] << 24)) >>> 0;
  }
  return values;
}

function charlmSigmoid(x) { return 1 / (1 + Math.exp(-x)); }

/** out[o0 + j] = W[r0 + j, :] . x for j < rows (W row-major, cols wide). */
function charlmMatvec(out, o0, W, r0, rows, cols, x) {
  for (let j = 0; j < rows; j++) {
    const base = (r0 + j) * cols;
    let s0 = 0, s1 = 0, s2 = 0, s3 = 0, k = 0;
    for (; k + 3 < cols; k += 4) {
      s0 += W[base + k] * x[k]; s1 += W[base + k + 1] * x[k + 1];
      s2 += W[base + k + 2] * x[k + 2]; s3 += W[base + k + 3] * x[k + 3];
    }
    for (; k < cols; k++) s0 += W[base + k] * x[k];
    out[o0 + j] = (s0 + s1) + (s2 + s3);
  }
}

/** out = LayerNorm(v[0:n]) * gain + shift (shift may be null), torch's biased variance. */
function charlmLayerNorm(out, v, n, gain, shift) {
  let mean = 0;
  for (let k = 0; k < n; k++) mean += v[k];
  mean /= n;
  let variance = 0;
  for (let k = 0; k < n; k++) variance += (v[k] - mean) ** 2;
  const rstd = 1 / Math.sqrt(variance / n + CHARLM_LN_EPS);
  for (let k = 0; k < n; k++) out[k] = (v[k] - mean) * rstd * gain[k] + (shift ? shift[k] : 0);
}

// The steps. Each gets the layer's spec (kind, options, sizes) and T(name), its tensors; it returns
// step(xw, state), which updates state (an array of Float64Array, h first) in place from the projected input xw.
const CHARLM_STEPS = {
  elman(spec, T) {
    const H = spec.hidden, U = T("weight_hh"), a = new Float64Array(H), relu = spec.options.relu;
    return (xw, [h]) => {
      charlmMatvec(a, 0, U, 0, H, H, h);
      for (let j = 0; j < H; j++) { const v = xw[j] + a[j]; h[j] = relu ? Math.max(v, 0) : Math.tanh(v); }
    };
  },
  linear(spec, T) {
    const H = spec.hidden, U = T("weight_hh"), a = new Float64Array(H);
    return (xw, [h]) => {
      charlmMatvec(a, 0, U, 0, H, H, h);
      for (let j = 0; j < H; j++) h[j] = xw[j] + a[j];
    };
  },
  gated(spec, T) {  // the LSTM family: charlm/cells/lstm.py's GatedLSTMCell with its GateConfig
    const H = spec.hidden, o = spec.options, blocks = o.blocks, U = T("weight_hh");
    const gates = new Float64Array(blocks.length * H), at = {}, pk = {};
    [...blocks].forEach((b, k) => { at[b] = k * H; });
    [...o.peep].forEach((b, k) => { pk[b] = k * H; });
    const P = o.peep ? T("peephole") : null, hasI = "i" in at, hasF = "f" in at, hasO = "o" in at;
    const peepI = "i" in pk, peepF = "f" in pk, peepO = "o" in pk;
    return (xw, [h, c]) => {
      charlmMatvec(gates, 0, U, 0, blocks.length * H, H, h);
      for (let j = 0; j < H; j++) {
        const cj = c[j];
        const i = hasI ? charlmSigmoid(xw[at.i + j] + gates[at.i + j] + (peepI ? P[pk.i + j] * cj : 0)) : null;
        const f = hasF ? charlmSigmoid(xw[at.f + j] + gates[at.f + j] + (peepF ? P[pk.f + j] * cj : 0))
          : o.coupled ? 1 - i : null;
        const ag = xw[at.g + j] + gates[at.g + j], g = o.g_tanh ? Math.tanh(ag) : ag;
        let cn = f !== null ? f * cj : cj;
        cn = i !== null ? cn + i * g : cn + g;
        const a = o.out_tanh ? Math.tanh(cn) : cn;
        const og = hasO ? charlmSigmoid(xw[at.o + j] + gates[at.o + j] + (peepO ? P[pk.o + j] * cn : 0)) : null;
        h[j] = og !== null ? og * a : a;
        c[j] = cn;
      }
    };
  },
  fgr(spec, T) {  // peephole LSTM with the previous step's gates fed back (GateRecurrentLSTMCell)
    const H = spec.hidden, U = T("weight_hh"), G = T("weight_gg"), P = T("peephole");
    const gates = new Float64Array(4 * H), rec = new Float64Array(3 * H);
    return (xw, [h, c, prev]) => {
      charlmMatvec(rec, 0, G, 0, 3 * H, 3 * H, prev);
      charlmMatvec(gates, 0, U, 0, 4 * H, H, h);
      for (let j = 0; j < H; j++) {
        const cj = c[j];
        const i = charlmSigmoid(xw[j] + rec[j] + gates[j] + P[j] * cj);
        const f = charlmSigmoid(xw[H + j] + rec[H + j] + gates[H + j] + P[H + j] * cj);
        const g = Math.tanh(xw[2 * H + j] + gates[2 * H + j]);
        const cn = f * cj + i * g;
        const og = charlmSigmoid(xw[3 * H + j] + rec[2 * H + j] + gates[3 * H + j] + P[2 * H + j] * cn);
        h[j] = og * Math.tanh(cn); c[j] = cn;
        prev[j] = i; prev[H + j] = f; prev[2 * H + j] = og;
      }
    };
  },
  gru(spec, T) {  // nn.GRU's form, or Cho et al.'s with the reset inside the product (GRUCell)
    const H = spec.hidden, U = T("weight_hh"), inside = spec.options.reset_inside;
    const hw = new Float64Array(3 * H), rh = new Float64Array(H), z = new Float64Array(H);
    const bhn = inside ? null : T("bias_hn");
    return (xw, [h]) => {
      charlmMatvec(hw, 0, U, 0, inside ? 2 * H : 3 * H, H, h);
      for (let j = 0; j < H; j++) {
        const r = charlmSigmoid(xw[j] + hw[j]);
        z[j] = charlmSigmoid(xw[H + j] + hw[H + j]);
        rh[j] = inside ? r * h[j] : r;  // Cho: r * h enters the product; nn.GRU: r scales U_n h + b_hn
      }
      if (inside) charlmMatvec(hw, 2 * H, U, 2 * H, H, H, rh);
      for (let j = 0; j < H; j++) {
        const n = Math.tanh(xw[2 * H + j] + (inside ? hw[2 * H + j] : rh[j] * (hw[2 * H + j] + bhn[j])));
        h[j] = n + z[j] * (h[j] - n);
      }
    };
  },
  mut1(spec, T) { return charlmMut(spec, T, 1); },
  mut2(spec, T) { return charlmMut(spec, T, 2); },
  mut3(spec, T) { return charlmMut(spec, T, 3); },
  "lstm-ln"(spec, T) {  // LayerNormLSTMCell: LN(U h) with its gain, then the LSTM, then h' = o tanh(LN(c'))
    const H = spec.hidden, U = T("weight_hh"), gh = T("ln_hh_weight"), gc = T("ln_c_weight"), bc = T("ln_c_bias");
    const u = new Float64Array(4 * H), gates = new Float64Array(4 * H), cn = new Float64Array(H), og = new Float64Array(H);
    return (xw, [h, c]) => {
      charlmMatvec(u, 0, U, 0, 4 * H, H, h);
      charlmLayerNorm(gates, u, 4 * H, gh, null);
      for (let j = 0; j < H; j++) {
        const i = charlmSigmoid(xw[j] + gates[j]), f = charlmSigmoid(xw[H + j] + gates[H + j]);
        const g = Math.tanh(xw[2 * H + j] + gates[2 * H + j]);
        og[j] = charlmSigmoid(xw[3 * H + j] + gates[3 * H + j]);
        cn[j] = f * c[j] + i * g;
      }
      charlmLayerNorm(u, cn, H, gc, bc);
      for (let j = 0; j < H; j++) { h[j] = og[j] * Math.tanh(u[j]); c[j] = cn[j]; }
    };
  },
  mogrifier(spec, T) {  // MogrifierLSTMCell: x and h gate each other (2 s(a) = 1 + tanh(a / 2)), then the LSTM
    const H = spec.hidden, E = spec.input, R = spec.options.rounds;
    const W = T("weight_ih"), U = T("weight_hh"), b = T("bias");
    const rounds = Array.from({ length: R }, (_, k) => T(`round${k + 1}`));
    const x = new Float64Array(E), hm = new Float64Array(H), t = new Float64Array(Math.max(E, H));
    const gates = new Float64Array(4 * H), hg = new Float64Array(4 * H);
    return (xw, [h, c]) => {
      x.set(xw); hm.set(h);
      rounds.forEach((M, k) => {
        if (k % 2 === 0) {  // odd round: x = 2 s(Q h) * x, Q (E, H) halved
          charlmMatvec(t, 0, M, 0, E, H, hm);
          for (let j = 0; j < E; j++) x[j] += x[j] * Math.tanh(t[j]);
        } else {  // even round: h = 2 s(R x) * h, R (H, E) halved
          charlmMatvec(t, 0, M, 0, H, E, x);
          for (let j = 0; j < H; j++) hm[j] += hm[j] * Math.tanh(t[j]);
        }
      });
      charlmMatvec(gates, 0, W, 0, 4 * H, E, x);
      charlmMatvec(hg, 0, U, 0, 4 * H, H, hm);
      for (let j = 0; j < H; j++) {
        const i = charlmSigmoid(b[j] + gates[j] + hg[j]), f = charlmSigmoid(b[H + j] + gates[H + j] + hg[H + j]);
        const g = Math.tanh(b[2 * H + j] + gates[2 * H + j] + hg[2 * H + j]);
        const o = charlmSigmoid(b[3 * H + j] + gates[3 * H + j] + hg[3 * H + j]);
        c[j] = f * c[j] + i * g; h[j] = o * Math.tanh(c[j]);
      }
    };
  },
};

/** MUT1-3 (charlm/cells/mut_cells.py): h' = h + z (n - h), n = tanh(xw_n + U_h (r * h)). */
function charlmMut(spec, T, which) {
  const H = spec.hidden, U = T("weight_hh"), a = new Float64Array(2 * H), th = new Float64Array(H);
  const z = new Float64Array(H), rh = new Float64Array(H), n = new Float64Array(H);
  return (xw, [h]) => {
    if (which === 1) {  // z = s(xw_z), r = s(xw_r + U_r h); U_h is the second block
      charlmMatvec(a, H, U, 0, H, H, h);
      for (let j = 0; j < H; j++) { z[j] = charlmSigmoid(xw[j]); rh[j] = charlmSigmoid(xw[H + j] + a[H + j]) * h[j]; }
    } else {
      if (which === 3) for (let j = 0; j < H; j++) th[j] = Math.tanh(h[j]);
      charlmMatvec(a, 0, U, 0, H, H, which === 3 ? th : h);  // z's block reads tanh(h) in MUT3
      charlmMatvec(a, H, U, H, H, H, h);
      for (let j = 0; j < H; j++) { z[j] = charlmSigmoid(xw[j] + a[j]); rh[j] = charlmSigmoid(xw[H + j] + a[H + j]) * h[j]; }
    }
    charlmMatvec(n, 0, U, which === 1 ? H : 2 * H, H, H, rh);
    for (let j = 0; j < H; j++) { const nj = Math.tanh(xw[2 * H + j] + n[j]); h[j] = h[j] + z[j] * (nj - h[j]); }
  };
}

// Input projections of layers after the first (the first reads its table): the cell's `project`.
const CHARLM_PROJECTIONS = {
  affine(spec, T, K) {
    const W = T("proj_weight"), b = T("proj_bias");
    return (x, xw) => { charlmMatvec(xw, 0, W, 0, K, spec.input, x); for (let k = 0; k < K; k++) xw[k] += b[k]; };
  },
  mut1(spec, T, K) {  // MUT1Cell.project: [W_z x + b_z, W_r x + b_r + b_hr, tanh(P x + b_p) + b_hh]
    const W = T("proj_weight"), b = T("proj_bias"), post = T("post_bias"), H = spec.hidden;
    return (x, xw) => {
      charlmMatvec(xw, 0, W, 0, K, spec.input, x);
      for (let k = 0; k < K; k++) xw[k] += b[k];
      for (let j = 0; j < H; j++) { xw[H + j] += post[j]; xw[2 * H + j] = Math.tanh(xw[2 * H + j]) + post[H + j]; }
    };
  },
  ln(spec, T, K) {  // LayerNormLSTMCell.project: LN(W x) with its gain, shifted by the summed biases
    const W = T("proj_weight"), gain = T("ln_ih_weight"), shift = T("proj_bias"), v = new Float64Array(K);
    return (x, xw) => { charlmMatvec(v, 0, W, 0, K, spec.input, x); charlmLayerNorm(xw, v, K, gain, shift); };
  },
  identity() { return (x, xw) => xw.set(x); },
};

/** The model: embedding (layer 0's table) -> the layers (each with its LayerNorm, if any) -> the decoder. */
class CharlmModel {
  constructor(meta, values) {
    const byName = new Map(meta.weights.tensors.map((t) => [t.name, t]));
    const tensor = (name) => {
      const t = byName.get(name);
      if (!t) throw new Error(`the page has no tensor ${name}`);
      return values.subarray(t.offset, t.offset + t.shape.reduce((a, b) => a * b, 1));
    };
    this.vocab = meta.vocab;
    this.index = new Map(meta.vocab.map((ch, i) => [ch, i]));
    this.layers = meta.layers.map((spec, i) => {
      const T = (name) => tensor(`layers.${i}.${name}`);
      if (!(spec.kind in CHARLM_STEPS)) throw new Error(`this page has no step for the cell kind ${spec.kind}`);
      const layer = { spec, step: CHARLM_STEPS[spec.kind](spec, T), states: spec.states };
      if (i === 0) {
        layer.table = T("table");
        layer.xw = new Float64Array(layer.table.length / meta.vocab.length);
      } else {
        const K = spec.project === "identity" ? spec.input : byName.get(`layers.${i}.proj_bias`).shape[0];
        layer.xw = new Float64Array(K);
        layer.project = CHARLM_PROJECTIONS[spec.project](spec, T, K);
      }
      if (meta.layer_norm) {
        layer.norm = [T("norm_weight"), T("norm_bias")];
        layer.out = new Float64Array(spec.hidden);
      }
      return layer;
    });
    this.decoder = [tensor("decoder.weight"), tensor("decoder.bias")];
    this.logits = new Float64Array(meta.vocab.length);
    this.reset();
  }

  /** Every layer's state back to zeros, as a new text starts. */
  reset() { for (const layer of this.layers) layer.state = layer.states.map((n) => new Float64Array(n)); }

  /** The ids of a text's characters (by code point), or an error naming the characters the model lacks. */
  encode(text, what = "the prime") {
    const ids = [], missing = new Map();
    for (const ch of text) {
      const id = this.index.get(ch);
      if (id === undefined) missing.set(ch, (missing.get(ch) || 0) + 1); else ids.push(id);
    }
    if (missing.size) {
      const listed = [...missing].sort((a, b) => b[1] - a[1]).slice(0, 10).map(([ch, n]) => `${JSON.stringify(ch)} (${n}x)`);
      const count = [...missing.values()].reduce((a, b) => a + b, 0);
      throw new Error(`${what} has ${count} character(s) outside the model's ${this.vocab.length}-character vocabulary: ${listed.join(", ")}`);
    }
    return ids;
  }

  /** Read one character (its id); returns the scores of the next (this.logits, overwritten by the next step). */
  step(id) {
    let x = null;
    this.layers.forEach((layer, i) => {
      const xw = layer.xw;
      if (i === 0) { const K = xw.length; for (let k = 0; k < K; k++) xw[k] = layer.table[id * K + k]; }
      else layer.project(x, xw);
      layer.step(xw, layer.state);
      x = layer.state[0];
      if (layer.norm) { charlmLayerNorm(layer.out, x, layer.spec.hidden, layer.norm[0], layer.norm[1]); x = layer.out; }
    });
    const [W, b] = this.decoder, V = this.logits.length;
    charlmMatvec(this.logits, 0, W, 0, V, x.length, x);
    for (let v = 0; v < V; v++) this.logits[v] += b[v];
    return this.logits;
  }
}

/** A seeded source of uniform numbers in [0, 1) with 53 random bits (mulberry32, two draws a number). */
function charlmRandom(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
  return () => ((next() >>> 5) * 67108864 + (next() >>> 6)) / 9007199254740992;
}

/** The weights a draw uses (charlm's `pick`): softmax(logits / temperature) over the top-k scores (ties at the
 * k-th kept), then 0 outside the nucleus: the likeliest characters whose mass, before each, is below topP. */
function charlmProbabilities(logits, temperature, topK, topP) {
  const V = logits.length, p = new Float64Array(V);
  let max = -Infinity;
  for (let v = 0; v < V; v++) {
    if (!Number.isFinite(logits[v])) throw new Error(CHARLM_NOT_FINITE);
    max = Math.max(max, logits[v]);
  }
  for (let v = 0; v < V; v++) p[v] = (logits[v] - max) / temperature;
  if (topK && topK < V) {
    const kth = Array.from(p).sort((a, b) => b - a)[topK - 1];
    for (let v = 0; v < V; v++) if (p[v] < kth) p[v] = -Infinity;
  }
  let sum = 0;
  for (let v = 0; v < V; v++) { p[v] = Math.exp(p[v]); sum += p[v]; }
  for (let v = 0; v < V; v++) p[v] /= sum;
  if (topP !== null && topP !== undefined && topP < 1) {
    const order = Array.from(p.keys()).sort((a, b) => p[b] - p[a] || a - b);  // descending, ties by id
    let before = 0;
    const drop = [];
    for (const v of order) { if (before >= topP) drop.push(v); before += p[v]; }
    for (const v of drop) p[v] = 0;
  }
  return p;
}

/** The next id: the likeliest (the first of equals) at temperature 0, else a draw (charlm's `draw`): the first id
 * whose running sum of weights exceeds u times their sum. */
function charlmPick(logits, temperature, topK, topP, random) {
  if (temperature === 0) {
    let best = 0;
    for (let v = 0; v < logits.length; v++) {
      if (!Number.isFinite(logits[v])) throw new Error(CHARLM_NOT_FINITE);
      if (logits[v] > logits[best]) best = v;
    }
    return best;
  }
  const p = charlmProbabilities(logits, temperature, topK, topP);
  let total = 0;
  for (let v = 0; v < p.length; v++) total += p[v];
  const threshold = random() * total;
  let running = 0;
  for (let v = 0; v < p.length; v++) { running += p[v]; if (running > threshold) return v; }
  return p.length - 1;
}

/** The characters after a prime, one id per next(): the prime read from a zero state, then pick, step, pick ... */
function* charlmContinue(model, primeIds, length, { temperature, topK, topP, seed }) {
  if (!primeIds.length) throw new Error("the prime is empty: give at least one character for the model to continue");
  const random = charlmRandom(seed);
  model.reset();
  let logits = null;
  for (const id of primeIds) logits = model.step(id);
  for (let n = 0; n < length; n++) {
    const id = charlmPick(logits, temperature, topK, topP, random);
    yield id;
    if (n + 1 < length) logits = model.step(id);
  }
}

/** ln p(text[1:] | text[0]) from a zero state, as `charlm eval --text` scores a text with one stream. */
function charlmLogprob(model, ids) {
  model.reset();
  let total = 0;
  for (let t = 0; t + 1 < ids.length; t++) {
    const logits = model.step(ids[t]);
    let max = -Infinity, sum = 0;
    for (const v of logits) max = Math.max(max, v);
    for (const v of logits) sum += Math.exp(v - max);
    total += logits[ids[t + 1]] - max - Math.log(sum);
  }
  const chars = ids.length - 1;
  return { logprob: total, chars, loss: -total / chars, bpc: -total / chars / Math.LN2 };
}
