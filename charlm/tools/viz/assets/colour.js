// The colour scale of charlm's per-character views, in one place. charlmColour(x): x in [-1, 1]
// (clamped) -> a CSS colour: negative blue, 0 white, positive red, the strength growing with |x|.
// charlmShade(kind, v, scale) maps a raw value onto x: "surprisal" (nats, 0 .. CHARLM_SURPRISAL_MAX
// -> 0 .. 1), "unit" (a sigmoid gate in [0, 1] -> -1 .. 1, 0.5 white), "signed" (v / scale, scale the
// unit's largest |v| over the text).
const CHARLM_SURPRISAL_MAX = 6.0;

function charlmColour(x) {
  if (!Number.isFinite(x)) return "transparent";
  const a = Math.min(1, Math.abs(x));
  const fade = (full) => Math.round(255 - a * (255 - full));
  return x >= 0 ? `rgb(255,${fade(80)},${fade(60)})` : `rgb(${fade(50)},${fade(110)},255)`;
}

function charlmShade(kind, v, scale) {
  if (v === null || v === undefined || !Number.isFinite(v)) return NaN;
  if (kind === "surprisal") return Math.min(1, v / CHARLM_SURPRISAL_MAX);
  if (kind === "unit") return 2 * v - 1;
  return scale > 0 ? v / scale : 0;
}
