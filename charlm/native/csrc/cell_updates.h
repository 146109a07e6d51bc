// The cell updates of the fused step (fused_step.cpp): after a layer's products, each row's gates, state and
// norms in a few vectorised loops; and the layer kinds and flags that say which update a layer takes.
#pragma once

#include "fast_math.h"

#include <cmath>
#include <cstdint>

namespace charlm_fused {

using charlm_math::fast_exp;
using charlm_math::madd;
using charlm_math::sigmoid;
using charlm_math::tanh_;

// the layer kinds, and the bits of a layer's flags
enum Kind : int64_t { GATED = 0, GRU = 1, NORM_LSTM = 2, MOGRIFIER = 3 };
enum Flag : int64_t {
  INPUT = 1, FORGET = 2, OUTPUT = 4, COUPLED = 8, G_TANH = 16, OUT_TANH = 32, PEEP = 64,  // GateConfig's
  LAYER_NORM = 128,  // model.layer_norm: a LayerNorm on the layer's output (2 extras: weight, bias)
  TABLE_NORMALISED = 256,  // NORM_LSTM layer 0: the table holds LN(W x) g + b already
};
constexpr double CELL_EPS = 1e-5;  // the layer-normalised LSTM's norms (charlm/cells/norm_lstm.py)

// ------------------------------------------------------------------------------------------ the updates
inline void sigmoid_(float* a, int64_t n) {
  for (int64_t u = 0; u < n; ++u) a[u] = sigmoid(a[u]);
}
inline void tanh_all(float* a, int64_t n) {
  for (int64_t u = 0; u < n; ++u) a[u] = tanh_(a[u]);
}

// y = (v - mean) / sqrt(var + eps) * gain (+ shift): F.layer_norm over n values (biased variance).
inline void layer_norm(const float* v, int64_t n, double eps, const float* gain, const float* shift, float* y) {
  double sum = 0.0;
  for (int64_t u = 0; u < n; ++u) sum += v[u];
  const double mean = sum / static_cast<double>(n);
  double sq = 0.0;
  for (int64_t u = 0; u < n; ++u) sq += (v[u] - mean) * (v[u] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(n) + eps));
  const float m = static_cast<float>(mean);
  for (int64_t u = 0; u < n; ++u) y[u] = (v[u] - m) * rstd * gain[u] + (shift != nullptr ? shift[u] : 0.0f);
}

// The LSTM family (GatedLSTMCell.step_gates): the gate buffer holds the blocks present in the order i, f, o,
// g (charlm/model/fused_step.py reorders nn.LSTM's i, f, g, o), the peephole blocks in the order i, f, o.
inline void gated_update(int64_t flags, float* a, const float* peep, const float* c0, float* c, float* h, int64_t hs) {
  const bool has_i = flags & INPUT, has_f = (flags & FORGET) && !(flags & COUPLED), has_o = flags & OUTPUT;
  const bool peephole = flags & PEEP;
  float* a_i = has_i ? a : nullptr;
  float* a_f = has_f ? a + hs * has_i : nullptr;
  float* a_o = has_o ? a + hs * (has_i + has_f) : nullptr;
  float* g = a + hs * (has_i + has_f + has_o);
  if (peephole) {  // on c for i and f (blocks i, f, o of the peephole vector, those present)
    if (has_i)
      for (int64_t u = 0; u < hs; ++u) a_i[u] = madd(peep[u], c0[u], a_i[u]);
    if (has_f)
      for (int64_t u = 0; u < hs; ++u) a_f[u] = madd(peep[hs * has_i + u], c0[u], a_f[u]);
  }
  // the sigmoid gates that are ready (i, f, and o unless its peephole waits for c'): the first blocks
  sigmoid_(a, hs * (has_i + has_f + (has_o && !peephole)));
  if (flags & G_TANH) tanh_all(g, hs);
  if (has_f && has_i) {
    for (int64_t u = 0; u < hs; ++u) c[u] = madd(a_f[u], c0[u], a_i[u] * g[u]);
  } else if (has_f) {
    for (int64_t u = 0; u < hs; ++u) c[u] = madd(a_f[u], c0[u], g[u]);
  } else if (flags & COUPLED) {  // f = 1 - i
    for (int64_t u = 0; u < hs; ++u) c[u] = madd(1.0f - a_i[u], c0[u], a_i[u] * g[u]);
  } else if (has_i) {  // no forget gate: f = 1
    for (int64_t u = 0; u < hs; ++u) c[u] = c0[u] + a_i[u] * g[u];
  } else {
    for (int64_t u = 0; u < hs; ++u) c[u] = c0[u] + g[u];
  }
  if (has_o && peephole) {
    const float* p_o = peep + hs * (has_i + has_f);
    for (int64_t u = 0; u < hs; ++u) a_o[u] = madd(p_o[u], c[u], a_o[u]);
    sigmoid_(a_o, hs);
  }
  const bool out_tanh = flags & OUT_TANH;
  if (has_o && out_tanh) {
    for (int64_t u = 0; u < hs; ++u) h[u] = a_o[u] * tanh_(c[u]);
  } else if (has_o) {
    for (int64_t u = 0; u < hs; ++u) h[u] = a_o[u] * c[u];
  } else if (out_tanh) {
    for (int64_t u = 0; u < hs; ++u) h[u] = tanh_(c[u]);
  } else {
    std::copy_n(c, hs, h);
  }
}

// nn.GRU's cell: the buffer holds r, z (input and recurrent sums), n's input sum and n's recurrent sum.
inline void gru_update(float* a, const float* h0, float* h, int64_t hs) {
  sigmoid_(a, 2 * hs);
  const float *r = a, *z = a + hs, *nx = a + 2 * hs, *nh = a + 3 * hs;
  for (int64_t u = 0; u < hs; ++u) {
    const float n = tanh_(madd(r[u], nh[u], nx[u]));
    h[u] = madd(z[u], h0[u] - n, n);
  }
}

// The layer-normalised LSTM (LayerNormLSTMCell.step_gates): the buffer holds W x (4H; layer 0: the finished
// LN(W x) g_ih + b), then U h (4H), gates in the order i, f, o, g; extras: g_ih, g_hh, b, g_c, b_c.
inline void norm_lstm_update(int64_t flags, float* a, const float* const* extra, const float* c0, float* c, float* h,
                      int64_t hs) {
  const int64_t g4 = 4 * hs;
  float* gates = a;
  if (!(flags & TABLE_NORMALISED)) layer_norm(a, g4, CELL_EPS, extra[0], extra[2], gates);
  float* rec = a + g4;
  layer_norm(rec, g4, CELL_EPS, extra[1], nullptr, rec);
  for (int64_t u = 0; u < g4; ++u) gates[u] += rec[u];
  sigmoid_(gates, 3 * hs);
  tanh_all(gates + 3 * hs, hs);
  const float *i = gates, *f = gates + hs, *o = gates + 2 * hs, *g = gates + 3 * hs;
  for (int64_t u = 0; u < hs; ++u) c[u] = madd(f[u], c0[u], i[u] * g[u]);
  float* normed = rec;  // free again
  layer_norm(c, hs, CELL_EPS, extra[3], extra[4], normed);
  for (int64_t u = 0; u < hs; ++u) h[u] = o[u] * tanh_(normed[u]);
}

}  // namespace charlm_fused
