// charlm viz: colours each character of the text by the chosen quantity, shows the model's next-character
// guesses on hover / tap, and lists the units that track each feature. All data is in #charlm-data.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("charlm-data").textContent);
  const $ = (id) => document.getElementById(id);
  const layers = D.layers;
  const decoded = new Map();  // "layer/quantity" -> Int8Array (T x H codes)
  const byNumber = new Map(layers.map((l) => [l.number, l]));

  function codes(number, quantity) {
    const key = number + "/" + quantity;
    if (!decoded.has(key)) {
      const raw = atob(byNumber.get(number).quantities[quantity].data);
      const out = new Int8Array(raw.length);
      for (let i = 0; i < raw.length; i++) out[i] = (raw.charCodeAt(i) << 24) >> 24;
      decoded.set(key, out);
    }
    return decoded.get(key);
  }

  const shown = (ch) => (ch === "\n" ? "\u21B5" : ch === " " ? "\u2423" : ch === "\t" ? "\u21E5" : ch);

  // the text: one span per character
  const chars = Array.from(D.text);
  const textBox = $("text");
  const spans = [];
  const frag = document.createDocumentFragment();
  chars.forEach((ch, i) => {
    const s = document.createElement("span");
    s.textContent = ch;
    s.dataset.i = String(i);
    if (ch === "\n") s.className = "nl";
    spans.push(s);
    frag.appendChild(s);
  });
  textBox.appendChild(frag);
  $("title").textContent = `${D.title} \u2014 ${D.cell}, ${layers.length} layer(s) shown, ${chars.length} characters`;

  // the selectors
  const quantitySel = $("quantity"), layerSel = $("layer"), unitIn = $("unit"), slider = $("unit-slider");
  const names = ["surprisal"];
  layers.forEach((l) => Object.keys(l.quantities).forEach((q) => { if (!names.includes(q)) names.push(q); }));
  const label = { surprisal: "surprisal (-ln p of the character)", h: "hidden state h", c: "cell state c" };
  names.forEach((q) => quantitySel.add(new Option(label[q] || `gate ${q}`, q)));
  const state = { quantity: "surprisal", layer: layers.length ? layers[0].number : 0, unit: 0, underline: "" };

  function fillLayers() {
    const keep = state.layer;
    layerSel.innerHTML = "";
    layers.filter((l) => state.quantity in l.quantities).forEach((l) => layerSel.add(new Option(String(l.number), l.number)));
    const ok = Array.from(layerSel.options).map((o) => Number(o.value));
    state.layer = ok.includes(keep) ? keep : ok[0];
    layerSel.value = String(state.layer);
  }

  function unitValue(i) {
    const l = byNumber.get(state.layer), q = l.quantities[state.quantity];
    return (codes(state.layer, state.quantity)[i * l.size + state.unit] / 127) * q.scale[state.unit];
  }

  function recolour() {
    const unitMode = state.quantity !== "surprisal";
    $("layer-box").style.display = unitMode ? "" : "none";
    $("unit-box").style.display = unitMode ? "" : "none";
    let kind = "surprisal", scale = 0;
    if (unitMode) {
      const l = byNumber.get(state.layer);
      state.unit = Math.max(0, Math.min(l.size - 1, state.unit));
      unitIn.max = slider.max = String(l.size - 1);
      unitIn.value = slider.value = String(state.unit);
      const q = l.quantities[state.quantity];
      kind = q.range; scale = q.scale[state.unit];
    }
    for (let i = 0; i < spans.length; i++) {
      const v = unitMode ? unitValue(i) : D.surprisal[i];
      spans[i].style.backgroundColor = charlmColour(charlmShade(kind, v, scale));
    }
    legend(kind, scale);
    markCurrent();
    location.hash = unitMode ? `q=${state.quantity}&l=${state.layer}&u=${state.unit}&f=${state.underline}` : `f=${state.underline}`;
  }

  function legend(kind, scale) {
    const stops = kind === "surprisal" ? [0, 0.5, 1] : [-1, 0, 1];
    const bar = `<span class="bar" style="background: linear-gradient(to right, ${stops.map(charlmColour).join(", ")})"></span>`;
    const ends = kind === "surprisal" ? ["0 nats", `${CHARLM_SURPRISAL_MAX}+ nats`]
      : kind === "unit" ? ["0", "1"] : [(-scale).toFixed(3), scale.toFixed(3)];
    $("legend").innerHTML = `<span>${ends[0]}</span>${bar}<span>${ends[1]}</span>`;
  }

  function underline() {
    const f = (D.features || []).find((x) => x.name === state.underline);
    spans.forEach((s, i) => s.classList.toggle("under", !!f && f.values[i] > 0));
  }

  // hover / tap: the model's guesses for the next character
  let pinned = null;
  function info(i) {
    const ch = chars[i], s = D.surprisal[i], k = D.top_k;
    let html = `<div>character ${i}: <b class="ch">${esc(shown(ch))}</b></div>`;
    html += s === null ? "<div>surprisal: none (no context yet)</div>"
      : `<div>surprisal: ${s.toFixed(3)} nats (${(s / Math.LN2).toFixed(3)} bits)</div>`;
    if (state.quantity !== "surprisal") html += `<div>${esc(state.quantity)} of layer ${state.layer}, unit ${state.unit}: ${unitValue(i).toFixed(4)}</div>`;
    html += "<div>next character, after this one:</div><table>";
    for (let j = 0; j < k; j++) {
      const id = D.top_ids[i * k + j], p = D.top_probs[i * k + j];
      const mark = i + 1 < chars.length && chars[i + 1] === D.vocab[id] ? " \u2190 next" : "";
      html += `<tr><td class="ch">${esc(shown(D.vocab[id]))}</td><td class="p">${p.toFixed(3)}</td>` +
        `<td class="barcell" style="width:50%"><div style="width:${(100 * p).toFixed(1)}%"></div></td><td>${mark}</td></tr>`;
    }
    $("info").innerHTML = html + "</table>";
  }
  function esc(t) { return t.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]); }
  textBox.addEventListener("mouseover", (e) => { if (pinned === null && e.target.dataset.i) info(Number(e.target.dataset.i)); });
  textBox.addEventListener("click", (e) => {
    if (!e.target.dataset.i) return;
    const i = Number(e.target.dataset.i);
    if (pinned !== null) spans[pinned].classList.remove("pinned");
    pinned = pinned === i ? null : i;
    if (pinned !== null) spans[pinned].classList.add("pinned");
    info(i);
  });

  // the units that track each feature (--find-units)
  const unitsBox = $("units");
  function units() {
    if (!D.features) { unitsBox.style.display = "none"; $("feature-box").style.display = "none"; return; }
    let html = "<div><b>Units that track a feature</b> (Pearson r over this text; click one to show it)</div>";
    D.features.forEach((f) => {
      html += `<h2>${esc(f.name)}</h2><div>${esc(f.description)}</div>`;
      if (!f.present) { html += '<div class="absent">not in this text</div>'; return; }
      html += "<table><tr><th>quantity</th><th>layer</th><th>unit</th><th>r</th></tr>";
      f.best.forEach((u) => {
        html += `<tr class="pick" data-f="${esc(f.name)}" data-q="${esc(u.quantity)}" data-l="${u.layer}" data-u="${u.unit}">` +
          `<td class="mono">${esc(u.quantity)}</td><td>${u.layer}</td><td>${u.unit}</td><td class="r">${u.r.toFixed(3)}</td></tr>`;
      });
      html += "</table>";
      if (f.values.every((v) => v === 0 || v === 1)) $("underline").add(new Option(f.name, f.name));
    });
    unitsBox.innerHTML = html;
    unitsBox.addEventListener("click", (e) => {
      const row = e.target.closest("tr.pick");
      if (!row) return;
      select(row.dataset.q, Number(row.dataset.l), Number(row.dataset.u));
      const binary = Array.from($("underline").options).some((o) => o.value === row.dataset.f);
      state.underline = binary ? row.dataset.f : "";
      $("underline").value = state.underline;
      underline(); recolour();
    });
  }
  function markCurrent() {
    unitsBox.querySelectorAll("tr.pick").forEach((r) => r.classList.toggle("current",
      r.dataset.q === state.quantity && Number(r.dataset.l) === state.layer && Number(r.dataset.u) === state.unit));
  }
  function select(q, l, u) {
    if (!names.includes(q)) return;
    state.quantity = q; quantitySel.value = q; state.layer = l; fillLayers(); state.unit = u;
  }

  quantitySel.addEventListener("change", () => { state.quantity = quantitySel.value; if (state.quantity !== "surprisal") fillLayers(); recolour(); });
  layerSel.addEventListener("change", () => { state.layer = Number(layerSel.value); recolour(); });
  unitIn.addEventListener("input", () => { state.unit = Number(unitIn.value) || 0; recolour(); });
  slider.addEventListener("input", () => { state.unit = Number(slider.value); recolour(); });
  $("underline").addEventListener("change", () => { state.underline = $("underline").value; underline(); recolour(); });

  units();
  // a selection in the address (#q=h&l=1&u=3&f=speaker_name&p=42: p pins a character) is restored, so a
  // view can be linked
  const want = new URLSearchParams(location.hash.slice(1));
  if (want.get("q") && want.get("q") !== "surprisal") select(want.get("q"), Number(want.get("l")), Number(want.get("u")));
  if (want.get("f")) { state.underline = want.get("f"); $("underline").value = state.underline; }
  underline();
  recolour();
  const pin = Number(want.get("p"));
  if (want.get("p") !== null && pin >= 0 && pin < spans.length) spans[pin].click();
  document.body.dataset.ready = "1";
})();
