// The time loop of the normalised LSTMs (lstm-ln, lstm-bn) on the CPU, forward and backward. Each step
// is one product (U h going forward, dr U going back) through PyTorch and a few fused passes over the
// step's B rows, split between the threads: the norm statistics, the gate nonlinearities, the cell
// update and the cell norm in one go. The math is that of charlm/cells/fused_norm.py's Python kernel,
// which the tests hold this one to; its Python wrapper there does the input norm, the gains' gradients
// and dW_hh in bulk around the two loops.
//
// Layer norm (Ba et al. 2016): statistics per row, over the 4H (U h) or H (c') features.
// Batch norm (Cooijmans et al. 2016): statistics per feature, over the B rows; the running rows of
// step t (momentum, unbiased variance) move in place.
//
// Layouts: A / G are (T, B, 4H) with any step and row strides (the batch norm's are batch-major
// underneath) and unit stride along the features; everything else is contiguous. Gate order i, f, g, o.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

// exp for float as Cephes' polynomial (about 1 ulp), written so that the compiler vectorises the loops
// that call it (std::exp would be a call per element); n = round(x / ln 2) by the 1.5 * 2^23 trick, as
// std::floor does not vectorise without -fno-trapping-math. Doubles (the tests' checks) use the library.
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  return y * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

template <typename S> inline S sigmoid(S x);
template <> inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }
template <> inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
template <typename S> inline S tanh_(S x);
template <> inline float tanh_(float x) { return 1.0f - 2.0f / (1.0f + fast_exp(2.0f * x)); }
template <> inline double tanh_(double x) { return std::tanh(x); }

// A statistic of row b, feature k: one per row (layer norm) or one per feature (batch norm).
template <bool batch, typename S> inline S pick(const S* s, int64_t b, int64_t k) {
  if constexpr (batch) return s[k]; else return s[b];
}

// Rows 0..B-1 of a step, split between the threads.
template <typename Fn> void for_rows(int64_t B, const Fn& fn) {
  at::parallel_for(0, B, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) fn(b);
  });
}

// Blocks [lo, hi) of F columns, split between the threads (the batch norm's statistics and sums).
template <typename Fn> void for_columns(int64_t F, const Fn& fn) { at::parallel_for(0, F, 64, fn); }

// Mean and 1/std (biased variance) of one row of F features.
template <typename S> void row_stats(const S* x, int64_t F, S eps, S& mean, S& rstd) {
  S s = 0, v = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < F; ++j) s += x[j];
  const S m = s / F;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < F; ++j) v += (x[j] - m) * (x[j] - m);
  mean = m;
  rstd = S(1) / std::sqrt(v / F + eps);
}

// Mean and 1/std of each of the F columns of x (B, F), and the running rows moved towards them.
template <typename S>
void col_stats(const S* x, int64_t B, int64_t F, S eps, S* mean, S* rstd, S* run_mean, S* run_var, S momentum) {
  const S unbias = B > 1 ? S(B) / S(B - 1) : S(1);
  for_columns(F, [&](int64_t lo, int64_t hi) {
    std::vector<S> var(hi - lo, S(0));
    std::fill(mean + lo, mean + hi, S(0));
    for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j) mean[j] += x[b * F + j];
    }
    for (int64_t j = lo; j < hi; ++j) mean[j] /= B;
    for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j) var[j - lo] += (x[b * F + j] - mean[j]) * (x[b * F + j] - mean[j]);
    }
    for (int64_t j = lo; j < hi; ++j) {
      const S v = var[j - lo] / B;
      rstd[j] = S(1) / std::sqrt(v + eps);
      run_mean[j] += momentum * (mean[j] - run_mean[j]);
      run_var[j] += momentum * (v * unbias - run_var[j]);
    }
  });
}

// Sums for a norm's backward over one row: s1 = sum of d, s2 = sum of d * xh.
template <typename S> void row_sums(const S* d, const S* xh, int64_t F, S& s1, S& s2) {
  S a = 0, c = 0;
#pragma omp simd reduction(+ : a, c)
  for (int64_t j = 0; j < F; ++j) {
    a += d[j];
    c += d[j] * xh[j];
  }
  s1 = a;
  s2 = c;
}

// The same sums down each of the F columns of d, xh (B, F).
template <typename S> void col_sums(const S* d, const S* xh, int64_t B, int64_t F, S* s1, S* s2) {
  for_columns(F, [&](int64_t lo, int64_t hi) {
    std::fill(s1 + lo, s1 + hi, S(0));
    std::fill(s2 + lo, s2 + hi, S(0));
    for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j) {
        s1[j] += d[b * F + j];
        s2[j] += d[b * F + j] * xh[b * F + j];
      }
    }
  });
}

// x @ W^T for one step: through oneDNN's packed weight where the caller packed one, else at::mm.
struct StepProduct {
  at::Tensor wt, packed;
  at::Tensor operator()(const at::Tensor& x) const {
    if (!packed.defined()) return at::mm(x, wt);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           c10::string_view, c10::List<std::optional<at::Scalar>>,
                                           std::optional<c10::string_view>)>();
    return op.call(x, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
};

// Forward, row b once the U h statistics are known: xh = N(U h), the gate activations (written over
// A's row, which holds N(W x) + b), and c' = f c + i g.
template <bool batch, typename S>
inline void gates_row(int64_t b, int64_t H, S* a, const S* r, S* xh, const S* mean, const S* rstd, const S* gain,
                      const S* c, S* c_new) {
#pragma omp simd
  for (int64_t k = 0; k < 4 * H; ++k) xh[k] = (r[k] - pick<batch>(mean, b, k)) * pick<batch>(rstd, b, k);
#pragma omp simd
  for (int64_t k = 0; k < 2 * H; ++k) a[k] = sigmoid<S>(a[k] + gain[k] * xh[k]);  // i, f
#pragma omp simd
  for (int64_t k = 2 * H; k < 3 * H; ++k) a[k] = tanh_<S>(a[k] + gain[k] * xh[k]);  // g
#pragma omp simd
  for (int64_t k = 3 * H; k < 4 * H; ++k) a[k] = sigmoid<S>(a[k] + gain[k] * xh[k]);  // o
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) c_new[j] = a[H + j] * c[j] + a[j] * a[2 * H + j];
}

// Forward, row b once the c' statistics are known: tanh(N(c')) and h = o tanh(N(c')).
template <bool batch, typename S>
inline void output_row(int64_t b, int64_t H, const S* o, const S* c_new, const S* mean, const S* rstd, const S* gain,
                       const S* shift, S* tc, S* h) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    tc[j] = tanh_<S>((c_new[j] - pick<batch>(mean, b, j)) * pick<batch>(rstd, b, j) * gain[j] + shift[j]);
    h[j] = o[j] * tc[j];
  }
}

template <typename S, bool batch>
std::vector<at::Tensor> forward_impl(at::Tensor A, const at::Tensor& h0, const at::Tensor& c0, const StepProduct& uh,
                                     const at::Tensor& g_hh, const at::Tensor& g_c, const at::Tensor& b_c,
                                     const at::Tensor& run_hh_mean, const at::Tensor& run_hh_var,
                                     const at::Tensor& run_c_mean, const at::Tensor& run_c_var, double momentum,
                                     double eps_) {
  const int64_t T = A.size(0), B = A.size(1), K = A.size(2), H = K / 4, tsa = A.stride(0), lda = A.stride(1);
  const S eps = static_cast<S>(eps_), mom = static_cast<S>(momentum);
  const auto opt = A.options();
  at::Tensor Hs = at::empty({T, B, H}, opt), Cs = at::empty({T + 1, B, H}, opt), TC = at::empty({T, B, H}, opt);
  at::Tensor X = at::empty({T, B, K}, opt);  // N(U h) of every step, before its gain
  const int64_t n_hh = batch ? K : B, n_c = batch ? H : B;  // statistics per step
  at::Tensor rstd_hh = at::empty({T, n_hh}, opt), mean_c = at::empty({T, n_c}, opt), rstd_c = at::empty({T, n_c}, opt);
  std::vector<S> mean_hh(n_hh);
  Cs[0].copy_(c0);
  S *a0 = A.data_ptr<S>(), *cs = Cs.data_ptr<S>(), *hs = Hs.data_ptr<S>(), *tc = TC.data_ptr<S>(), *xs = X.data_ptr<S>();
  const S *gh = g_hh.data_ptr<S>(), *gc = g_c.data_ptr<S>(), *bc = b_c.data_ptr<S>();
  at::Tensor h = h0.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor r = uh(h);  // (B, 4H)
    const S* rp = r.data_ptr<S>();
    S *mh = mean_hh.data(), *rh = rstd_hh.data_ptr<S>() + t * n_hh;
    S *mc = mean_c.data_ptr<S>() + t * n_c, *rc = rstd_c.data_ptr<S>() + t * n_c;
    S *a = a0 + t * tsa, *c_prev = cs + t * B * H, *c_new = c_prev + B * H, *x = xs + t * B * K;
    auto gates = [&](int64_t b) {
      gates_row<batch>(b, H, a + b * lda, rp + b * K, x + b * K, mh, rh, gh, c_prev + b * H, c_new + b * H);
    };
    auto output = [&](int64_t b) {
      output_row<batch>(b, H, a + b * lda + 3 * H, c_new + b * H, mc, rc, gc, bc, tc + (t * B + b) * H,
                        hs + (t * B + b) * H);
    };
    if constexpr (batch) {  // statistics down the columns between the passes over the rows
      col_stats<S>(rp, B, K, eps, mh, rh, run_hh_mean[t].data_ptr<S>(), run_hh_var[t].data_ptr<S>(), mom);
      for_rows(B, gates);
      col_stats<S>(c_new, B, H, eps, mc, rc, run_c_mean[t].data_ptr<S>(), run_c_var[t].data_ptr<S>(), mom);
      for_rows(B, output);
    } else {  // every row on its own: one pass
      for_rows(B, [&](int64_t b) {
        row_stats<S>(rp + b * K, K, eps, mh[b], rh[b]);
        gates(b);
        row_stats<S>(c_new + b * H, H, eps, mc[b], rc[b]);
        output(b);
      });
    }
    h = Hs[t];
  }
  return {Hs, Cs, TC, X, rstd_hh, mean_c, rstd_c};
}

// Backward, row b first: d a_o = dh tanh(N(c')) s'(a_o) into dG, dN(c') = dh o (1 - tanh^2) kept (for the
// cell norm's gain and shift), and the cell norm backward's inputs gain * dN(c') and N(c').
template <bool batch, typename S>
inline void output_row_back(int64_t b, int64_t H, const S* g, S* dg, const S* tc, const S* dh, const S* c_new,
                            const S* mean, const S* rstd, const S* gain, S* dchat, S* gd, S* xc) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const S o = g[3 * H + j];
    dg[3 * H + j] = dh[j] * tc[j] * o * (S(1) - o);
    dchat[j] = dh[j] * o * (S(1) - tc[j] * tc[j]);
    gd[j] = gain[j] * dchat[j];
    xc[j] = (c_new[j] - pick<batch>(mean, b, j)) * pick<batch>(rstd, b, j);
  }
}

// Backward, row b second: dc' (the carried dc plus the cell norm's backward over N values), d a_i, d a_f,
// d a_g into dG, dc for the step before (dc' f), and the U h norm backward's input gain * dG.
template <bool batch, typename S>
inline void gates_row_back(int64_t b, int64_t H, int64_t N, const S* g, S* dg, const S* c, const S* gd, const S* xc,
                           const S* rstd, const S* s1, const S* s2, S* dc, const S* gain, S* gdh) {
  const S inv = S(1) / N;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const S q = pick<batch>(rstd, b, j), a = pick<batch>(s1, b, j), e = pick<batch>(s2, b, j);
    const S dct = dc[j] + q * (gd[j] - inv * (a + xc[j] * e));
    const S i = g[j], f = g[H + j], gg = g[2 * H + j];
    dg[j] = dct * gg * i * (S(1) - i);
    dg[H + j] = dct * c[j] * f * (S(1) - f);
    dg[2 * H + j] = dct * i * (S(1) - gg * gg);
    dc[j] = dct * f;
  }
#pragma omp simd
  for (int64_t k = 0; k < 4 * H; ++k) gdh[k] = gain[k] * dg[k];
}

// Backward, row b last: d(U h), the U h norm's backward over N values.
template <bool batch, typename S>
inline void recurrent_row_back(int64_t b, int64_t K, int64_t N, const S* gdh, const S* xh, const S* rstd, const S* s1,
                               const S* s2, S* dr) {
  const S inv = S(1) / N;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    const S q = pick<batch>(rstd, b, k), a = pick<batch>(s1, b, k), e = pick<batch>(s2, b, k);
    dr[k] = q * (gdh[k] - inv * (a + xh[k] * e));
  }
}

template <typename S, bool batch>
std::vector<at::Tensor> backward_impl(const at::Tensor& dHs, const at::Tensor& dh_T, const at::Tensor& dc_T,
                                      const at::Tensor& G, const at::Tensor& Cs, const at::Tensor& TC,
                                      const at::Tensor& X, const at::Tensor& rstd_hh, const at::Tensor& mean_c,
                                      const at::Tensor& rstd_c, const StepProduct& back, const at::Tensor& g_hh,
                                      const at::Tensor& g_c) {
  const int64_t T = G.size(0), B = G.size(1), K = G.size(2), H = K / 4, tsg = G.stride(0), ldg = G.stride(1);
  const auto opt = G.options();
  at::Tensor dG = at::empty_like(G);  // laid out as G
  at::Tensor DR = at::empty({T, B, K}, opt), DCh = at::empty({T, B, H}, opt);
  at::Tensor dc = dc_T.clone().contiguous(), dh = (dHs[T - 1] + dh_T).contiguous();
  const int64_t n_hh = batch ? K : B, n_c = batch ? H : B, N_hh = batch ? B : K, N_c = batch ? B : H;
  std::vector<S> gd_c(B * H), xc(B * H), gd_hh(B * K), s1_c(n_c), s2_c(n_c), s1_hh(n_hh), s2_hh(n_hh);
  const S *g0 = G.data_ptr<S>(), *cs = Cs.data_ptr<S>(), *tc = TC.data_ptr<S>(), *xs = X.data_ptr<S>();
  const S *gh = g_hh.data_ptr<S>(), *gcw = g_c.data_ptr<S>();
  S *dg0 = dG.data_ptr<S>(), *dr0 = DR.data_ptr<S>(), *dch = DCh.data_ptr<S>(), *dcp = dc.data_ptr<S>();
  S *gdc = gd_c.data(), *xcp = xc.data(), *gdh = gd_hh.data();
  S *a_c = s1_c.data(), *e_c = s2_c.data(), *a_hh = s1_hh.data(), *e_hh = s2_hh.data();
  for (int64_t t = T - 1; t >= 0; --t) {
    const S* dhp = dh.data_ptr<S>();
    const S *g = g0 + t * tsg, *c_prev = cs + t * B * H, *c_new = c_prev + B * H, *xt = xs + t * B * K;
    const S *rh = rstd_hh.data_ptr<S>() + t * n_hh, *mc = mean_c.data_ptr<S>() + t * n_c;
    const S* rc = rstd_c.data_ptr<S>() + t * n_c;
    S* dg = dg0 + t * tsg;
    auto part1 = [&](int64_t b) {
      output_row_back<batch>(b, H, g + b * ldg, dg + b * ldg, tc + (t * B + b) * H, dhp + b * H, c_new + b * H, mc,
                             rc, gcw, dch + (t * B + b) * H, gdc + b * H, xcp + b * H);
    };
    auto part2 = [&](int64_t b) {
      gates_row_back<batch>(b, H, N_c, g + b * ldg, dg + b * ldg, c_prev + b * H, gdc + b * H, xcp + b * H, rc, a_c,
                            e_c, dcp + b * H, gh, gdh + b * K);
    };
    auto part3 = [&](int64_t b) {
      recurrent_row_back<batch>(b, K, N_hh, gdh + b * K, xt + b * K, rh, a_hh, e_hh, dr0 + (t * B + b) * K);
    };
    if constexpr (batch) {  // sums down the columns between the passes over the rows
      for_rows(B, part1);
      col_sums<S>(gdc, xcp, B, H, a_c, e_c);
      for_rows(B, part2);
      col_sums<S>(gdh, xt, B, K, a_hh, e_hh);
      for_rows(B, part3);
    } else {  // every row on its own: one pass
      for_rows(B, [&](int64_t b) {
        part1(b);
        row_sums<S>(gdc + b * H, xcp + b * H, H, a_c[b], e_c[b]);
        part2(b);
        row_sums<S>(gdh + b * K, xt + b * K, K, a_hh[b], e_hh[b]);
        part3(b);
      });
    }
    dh = back(DR[t]);  // dh_{t-1} = d(U h) U, plus what reaches h_{t-1} from above
    if (t > 0) dh.add_(dHs[t - 1]);
  }
  return {dG, DR, DCh, dh, dc};
}

at::Tensor or_undefined(const std::optional<at::Tensor>& x) { return x.has_value() ? *x : at::Tensor(); }

// (A (T,B,4H) = N(W x) + b, overwritten with the gate activations, h0, c0, U, U packed by oneDNN or None,
// the U h norm's gain, the c' norm's gain and shift, batch?, the running rows (batch norm), momentum,
// eps) -> [hs, cs (T+1), tanh(N(c')), N(U h), its 1/std, the c' norm's mean and 1/std].
std::vector<at::Tensor> forward(at::Tensor A, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                                const std::optional<at::Tensor>& w_hh_packed, const at::Tensor& g_hh,
                                const at::Tensor& g_c, const at::Tensor& b_c, bool batch,
                                const std::optional<at::Tensor>& run_hh_mean,
                                const std::optional<at::Tensor>& run_hh_var,
                                const std::optional<at::Tensor>& run_c_mean, const std::optional<at::Tensor>& run_c_var,
                                double momentum, double eps) {
  TORCH_CHECK(A.device().is_cpu() && A.dim() == 3 && A.stride(2) == 1 && A.size(2) % 4 == 0,
              "norm_lstm_forward: A must be a CPU (T, B, 4H) tensor with unit feature stride");
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "norm_lstm_forward: float32 or float64 only");
  TORCH_CHECK(!batch || (run_hh_mean && run_hh_var && run_c_mean && run_c_var),
              "norm_lstm_forward: the batch norm needs its running statistics");
  const StepProduct uh{w_hh.t(), or_undefined(w_hh_packed)};
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "norm_lstm_forward", [&] {
    auto impl = batch ? forward_impl<scalar_t, true> : forward_impl<scalar_t, false>;
    out = impl(A, h0, c0, uh, g_hh.contiguous(), g_c.contiguous(), b_c.contiguous(), or_undefined(run_hh_mean),
               or_undefined(run_hh_var), or_undefined(run_c_mean), or_undefined(run_c_var), momentum, eps);
  });
  return out;
}

// (dL/dhs, dL/dh_T, dL/dc_T, what forward kept, U, U^T packed by oneDNN or None, the two gains, batch?)
// -> [dG (laid out as G), d(U h) (T,B,4H), dN(c') (T,B,H), dh0, dc0].
std::vector<at::Tensor> backward(const at::Tensor& dHs, const at::Tensor& dh_T, const at::Tensor& dc_T,
                                 const at::Tensor& G, const at::Tensor& Cs, const at::Tensor& TC, const at::Tensor& X,
                                 const at::Tensor& rstd_hh, const at::Tensor& mean_c, const at::Tensor& rstd_c,
                                 const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hh_t_packed,
                                 const at::Tensor& g_hh, const at::Tensor& g_c, bool batch) {
  const StepProduct back{w_hh, or_undefined(w_hh_t_packed)};
  const at::Tensor d = dHs.contiguous();
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "norm_lstm_backward", [&] {
    auto impl = batch ? backward_impl<scalar_t, true> : backward_impl<scalar_t, false>;
    out = impl(d, dh_T, dc_T, G, Cs, TC, X, rstd_hh, mean_c, rstd_c, back, g_hh.contiguous(), g_c.contiguous());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(charlm, m) {
  m.def(
      "norm_lstm_forward(Tensor(a!) A, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hh_packed, Tensor g_hh, "
      "Tensor g_c, Tensor b_c, bool batch, Tensor(b!)? run_hh_mean, Tensor(c!)? run_hh_var, Tensor(d!)? run_c_mean, "
      "Tensor(e!)? run_c_var, float momentum, float eps) -> Tensor[]");
  m.def(
      "norm_lstm_backward(Tensor dHs, Tensor dh_T, Tensor dc_T, Tensor G, Tensor Cs, Tensor TC, Tensor X, "
      "Tensor rstd_hh, Tensor mean_c, Tensor rstd_c, Tensor w_hh, Tensor? w_hh_t_packed, Tensor g_hh, Tensor g_c, "
      "bool batch) -> Tensor[]");
}

// CompositeExplicitAutograd: every CPU backend key, the MkldnnCPU of a oneDNN-packed weight included.
TORCH_LIBRARY_IMPL(charlm, CompositeExplicitAutograd, m) {
  m.impl("norm_lstm_forward", TORCH_FN(forward));
  m.impl("norm_lstm_backward", TORCH_FN(backward));
}
