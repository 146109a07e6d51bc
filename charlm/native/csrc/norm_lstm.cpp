// The time loops of the normalised LSTMs (lstm-ln, lstm-bn) on the CPU, forward and backward. Each step
// is one product through PyTorch (U h going forward, d(U h) U going back) and one to five fused passes
// over the step's B rows, split between the threads: the three norms (of W x, U h and c'), the gate
// nonlinearities and the cell update going forward; the norms' backward, the gates' derivatives and the
// step's share of the gains' gradients going back. The math is that of the Python kernel in
// charlm/cells/norm_lstm_kernel.py, which the tests hold this one to; the Python wrapper in
// charlm/cells/norm_lstm_cpp.py adds dW_hh.
//
// Layer norm (Ba et al. 2016): statistics per row, over the 4H (W x, U h) or H (c') features.
// Batch norm (Cooijmans et al. 2016): statistics per feature, over the B rows; the running rows of
// step t (momentum, unbiased variance) move in place.
//
// Layouts: W x is (T, B, 4H) with any step and row strides and unit feature stride; everything else is
// contiguous, time-major. Gate order i, f, g, o.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fast_math.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

using charlm_math::sigmoid;
using charlm_math::tanh_;


// A statistic of row b, feature k: one per row (layer norm) or one per feature (batch norm).
template <bool batch, typename S> inline S pick(const S* s, int64_t b, int64_t k) {
  if constexpr (batch) return s[k]; else return s[b];
}

// The passes of a step run inside one OpenMP parallel region (one fork and join per step, a barrier
// between passes); each pass splits its rows, or its blocks of columns, between the team's threads.
// Without OpenMP (e.g. Apple's clang) the pragmas are ignored and everything runs on one thread.
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Rows 0..B-1 of a step, split between the threads (the barrier at the end is implied).
template <typename Fn> inline void each_row(int64_t B, const Fn& fn) {
#pragma omp for schedule(static)
  for (int64_t b = 0; b < B; ++b) fn(b);
}

// Blocks [lo, hi) of 64 of F columns, split between the threads (the batch norm's statistics and sums).
template <typename Fn> inline void each_block(int64_t F, const Fn& fn) {
  const int64_t n = (F + 63) / 64;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < n; ++i) fn(i * 64, std::min(F, i * 64 + 64));
}

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

// Mean and 1/std of columns [lo, hi) of x (B rows, ld apart), and the running rows moved towards them.
template <typename S>
void col_stats(const S* x, int64_t B, int64_t ld, int64_t lo, int64_t hi, S eps, S* mean, S* rstd, S* run_mean,
               S* run_var, S momentum) {
  S var[64] = {};
  std::fill(mean + lo, mean + hi, S(0));
  for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) mean[j] += x[b * ld + j];
  }
  for (int64_t j = lo; j < hi; ++j) mean[j] /= B;
  for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) var[j - lo] += (x[b * ld + j] - mean[j]) * (x[b * ld + j] - mean[j]);
  }
  const S unbias = B > 1 ? S(B) / S(B - 1) : S(1);
  for (int64_t j = lo; j < hi; ++j) {
    const S v = var[j - lo] / B;
    rstd[j] = S(1) / std::sqrt(v + eps);
    run_mean[j] += momentum * (mean[j] - run_mean[j]);
    run_var[j] += momentum * (v * unbias - run_var[j]);
  }
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

// The same sums down columns [lo, hi) of d, xh (B, F).
template <typename S>
void col_sums(const S* d, const S* xh, int64_t B, int64_t F, int64_t lo, int64_t hi, S* s1, S* s2) {
  std::fill(s1 + lo, s1 + hi, S(0));
  std::fill(s2 + lo, s2 + hi, S(0));
  for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) {
      s1[j] += d[b * F + j];
      s2[j] += d[b * F + j] * xh[b * F + j];
    }
  }
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

// Forward, row b once the statistics of W x and U h are known: their normalised values xi, xh, the
// gate activations a = s or tanh(g_x xi + g_h xh + b) written into the row of G, and c' = f c + i g.
template <bool batch, typename S>
inline void gates_row(int64_t b, int64_t H, const S* v, const S* r, S* xi, S* xh, S* a, const S* mean_in,
                      const S* rstd_in, const S* mean_hh, const S* rstd_hh, const S* g_ih, const S* shift,
                      const S* g_hh, const S* c, S* c_new) {
#pragma omp simd
  for (int64_t k = 0; k < 4 * H; ++k) {
    xi[k] = (v[k] - pick<batch>(mean_in, b, k)) * pick<batch>(rstd_in, b, k);
    xh[k] = (r[k] - pick<batch>(mean_hh, b, k)) * pick<batch>(rstd_hh, b, k);
    a[k] = g_ih[k] * xi[k] + shift[k] + g_hh[k] * xh[k];
  }
#pragma omp simd
  for (int64_t k = 0; k < 2 * H; ++k) a[k] = sigmoid<S>(a[k]);  // i, f
#pragma omp simd
  for (int64_t k = 2 * H; k < 3 * H; ++k) a[k] = tanh_<S>(a[k]);  // g
#pragma omp simd
  for (int64_t k = 3 * H; k < 4 * H; ++k) a[k] = sigmoid<S>(a[k]);  // o
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
std::vector<at::Tensor> forward_impl(const at::Tensor& V, const at::Tensor& g_ih, const at::Tensor& shift_,
                                     const at::Tensor& h0, const at::Tensor& c0, const StepProduct& uh,
                                     const at::Tensor& g_hh, const at::Tensor& g_c, const at::Tensor& b_c,
                                     const std::vector<at::Tensor>& running, double momentum, double eps_) {
  const int64_t T = V.size(0), B = V.size(1), K = V.size(2), H = K / 4, tsv = V.stride(0), ldv = V.stride(1);
  const S eps = static_cast<S>(eps_), mom = static_cast<S>(momentum);
  const auto opt = V.options();
  at::Tensor Hs = at::empty({T, B, H}, opt), Cs = at::empty({T + 1, B, H}, opt), TC = at::empty({T, B, H}, opt);
  at::Tensor G = at::empty({T, B, K}, opt);  // the gate activations i, f, g, o
  at::Tensor Xi = at::empty({T, B, K}, opt), Xh = at::empty({T, B, K}, opt);  // N(W x), N(U h) before their gains
  const int64_t n_g = batch ? K : B, n_c = batch ? H : B;  // statistics per step
  at::Tensor rstd_in = at::empty({T, n_g}, opt), rstd_hh = at::empty({T, n_g}, opt);
  at::Tensor mean_c = at::empty({T, n_c}, opt), rstd_c = at::empty({T, n_c}, opt);
  std::vector<S> means(2 * n_g);
  Cs[0].copy_(c0);
  const S *v0 = V.data_ptr<S>(), *gi = g_ih.data_ptr<S>(), *sh = shift_.data_ptr<S>(), *gh = g_hh.data_ptr<S>();
  const S *gc = g_c.data_ptr<S>(), *bc = b_c.data_ptr<S>();
  S *g0 = G.data_ptr<S>(), *cs = Cs.data_ptr<S>(), *hs = Hs.data_ptr<S>(), *tc = TC.data_ptr<S>();
  S *xi0 = Xi.data_ptr<S>(), *xh0 = Xh.data_ptr<S>();
  at::Tensor h = h0.contiguous();
  const int threads = at::get_num_threads();
  // the running statistics (batch norm): the first row and the row stride of each of the six
  std::vector<S*> run0(6, nullptr);
  std::vector<int64_t> run_ld(6, 0);
  for (size_t i = 0; batch && i < 6; ++i) {
    run0[i] = running[i].data_ptr<S>();
    run_ld[i] = running[i].stride(0);
  }
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor r = uh(h);  // (B, 4H)
    const S *rp = r.data_ptr<S>(), *v = v0 + t * tsv;
    S *mi = means.data(), *mh = mi + n_g, *ri = rstd_in.data_ptr<S>() + t * n_g, *rh = rstd_hh.data_ptr<S>() + t * n_g;
    S *mc = mean_c.data_ptr<S>() + t * n_c, *rc = rstd_c.data_ptr<S>() + t * n_c;
    S *a = g0 + t * B * K, *c_prev = cs + t * B * H, *c_new = c_prev + B * H;
    S *xi = xi0 + t * B * K, *xh = xh0 + t * B * K;
    auto gates = [&](int64_t b) {
      gates_row<batch>(b, H, v + b * ldv, rp + b * K, xi + b * K, xh + b * K, a + b * K, mi, ri, mh, rh, gi, sh, gh,
                       c_prev + b * H, c_new + b * H);
    };
    auto output = [&](int64_t b) {
      output_row<batch>(b, H, a + b * K + 3 * H, c_new + b * H, mc, rc, gc, bc, tc + (t * B + b) * H,
                        hs + (t * B + b) * H);
    };
    S* run[6];  // row t of each
    for (int i = 0; i < 6; ++i) run[i] = run0[i] ? run0[i] + t * run_ld[i] : nullptr;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      if constexpr (batch) {  // statistics down the columns between the passes over the rows
        each_block(K, [&](int64_t lo, int64_t hi) {
          col_stats<S>(v, B, ldv, lo, hi, eps, mi, ri, run[0], run[1], mom);
          col_stats<S>(rp, B, K, lo, hi, eps, mh, rh, run[2], run[3], mom);
        });
        each_row(B, gates);
        each_block(H, [&](int64_t lo, int64_t hi) {
          col_stats<S>(c_new, B, H, lo, hi, eps, mc, rc, run[4], run[5], mom);
        });
        each_row(B, output);
      } else {  // every row on its own: one pass
        each_row(B, [&](int64_t b) {
          row_stats<S>(v + b * ldv, K, eps, mi[b], ri[b]);
          row_stats<S>(rp + b * K, K, eps, mh[b], rh[b]);
          gates(b);
          row_stats<S>(c_new + b * H, H, eps, mc[b], rc[b]);
          output(b);
        });
      }
    }
    h = Hs[t];
  }
  return {Hs, Cs, G, TC, Xi, Xh, rstd_in, rstd_hh, mean_c, rstd_c};
}

// Per-thread sums over rows and steps of the gains' and shifts' gradients: d g_x, d b, d g_h [4H], d g_c, d b_c [H].
template <typename S> struct GainSums {
  int64_t K, H, width;
  std::vector<S> sums;
  GainSums(int64_t K_, int64_t H_, int threads)
      : K(K_), H(H_), width(3 * K_ + 2 * H_), sums(static_cast<size_t>(threads * width)) {}
  S* mine() { return sums.data() + thread_index() * width; }
  std::vector<at::Tensor> totals(const at::TensorOptions& opt) const {
    at::Tensor all = at::zeros({width}, opt);
    S* out = all.data_ptr<S>();
    for (size_t i = 0; i < sums.size(); ++i) out[i % width] += sums[i];
    return {all.slice(0, 0, K), all.slice(0, K, 2 * K), all.slice(0, 2 * K, 3 * K), all.slice(0, 3 * K, 3 * K + H),
            all.slice(0, 3 * K + H, width)};
  }
};

// Backward, row b first: d a_o = dh tanh(N(c')) s'(a_o) into dg, dN(c') = dh o (1 - tanh^2) (summed into the
// cell norm's gain and shift gradients), and the cell norm backward's inputs gain * dN(c') and N(c').
template <bool batch, typename S>
inline void output_row_back(int64_t b, int64_t H, const S* a, S* dg, const S* tc, const S* dh, const S* c_new,
                            const S* mean, const S* rstd, const S* gain, S* gd, S* xc, S* d_gc, S* d_bc) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const S o = a[3 * H + j], dchat = dh[j] * o * (S(1) - tc[j] * tc[j]);
    dg[3 * H + j] = dh[j] * tc[j] * o * (S(1) - o);
    gd[j] = gain[j] * dchat;
    xc[j] = (c_new[j] - pick<batch>(mean, b, j)) * pick<batch>(rstd, b, j);
    d_gc[j] += dchat * xc[j];
    d_bc[j] += dchat;
  }
}

// Backward, row b second: dc' (the carried dc plus the cell norm's backward over N values), d a_i, d a_f,
// d a_g into dg, dc for the step before (dc' f), and the two gate norms' backward inputs g_x dg and g_h dg.
template <bool batch, typename S>
inline void gates_row_back(int64_t b, int64_t H, int64_t N, const S* a, S* dg, const S* c, const S* gd, const S* xc,
                           const S* rstd, const S* s1, const S* s2, S* dc, const S* g_ih, const S* g_hh, S* gdi,
                           S* gdh) {
  const S inv = S(1) / N;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const S q = pick<batch>(rstd, b, j), m = pick<batch>(s1, b, j), e = pick<batch>(s2, b, j);
    const S dct = dc[j] + q * (gd[j] - inv * (m + xc[j] * e));
    const S i = a[j], f = a[H + j], g = a[2 * H + j];
    dg[j] = dct * g * i * (S(1) - i);
    dg[H + j] = dct * c[j] * f * (S(1) - f);
    dg[2 * H + j] = dct * i * (S(1) - g * g);
    dc[j] = dct * f;
  }
#pragma omp simd
  for (int64_t k = 0; k < 4 * H; ++k) {
    gdi[k] = g_ih[k] * dg[k];
    gdh[k] = g_hh[k] * dg[k];
  }
}

// Backward, row b last: d(W x) and d(U h), the two gate norms' backward over N values, and the row's share
// of the gains' and the shift's gradients.
template <bool batch, typename S>
inline void inputs_row_back(int64_t b, int64_t K, int64_t N, const S* dg, const S* gdi, const S* gdh, const S* xi,
                            const S* xh, const S* rstd_in, const S* rstd_hh, const S* si1, const S* si2,
                            const S* sh1, const S* sh2, S* dv, S* dr, S* d_gih, S* d_shift, S* d_ghh) {
  const S inv = S(1) / N;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    dv[k] = pick<batch>(rstd_in, b, k) * (gdi[k] - inv * (pick<batch>(si1, b, k) + xi[k] * pick<batch>(si2, b, k)));
    dr[k] = pick<batch>(rstd_hh, b, k) * (gdh[k] - inv * (pick<batch>(sh1, b, k) + xh[k] * pick<batch>(sh2, b, k)));
    d_gih[k] += dg[k] * xi[k];
    d_shift[k] += dg[k];
    d_ghh[k] += dg[k] * xh[k];
  }
}

template <typename S, bool batch>
std::vector<at::Tensor> backward_impl(const at::Tensor& dHs, const at::Tensor& dh_T, const at::Tensor& dc_T,
                                      const at::Tensor& G, const at::Tensor& Cs, const at::Tensor& TC,
                                      const at::Tensor& Xi, const at::Tensor& Xh, const at::Tensor& rstd_in,
                                      const at::Tensor& rstd_hh, const at::Tensor& mean_c, const at::Tensor& rstd_c,
                                      const StepProduct& back, const at::Tensor& g_ih, const at::Tensor& g_hh,
                                      const at::Tensor& g_c) {
  const int64_t T = G.size(0), B = G.size(1), K = G.size(2), H = K / 4;
  const auto opt = G.options();
  at::Tensor dV = at::empty({T, B, K}, opt), DR = at::empty({T, B, K}, opt);
  at::Tensor dc = dc_T.clone().contiguous(), dh = (dHs[T - 1] + dh_T).contiguous();
  const int64_t n_g = batch ? K : B, n_c = batch ? H : B, N_g = batch ? B : K, N_c = batch ? B : H;
  // one step's scratch: dG, g_x dG, g_h dG, gain * dN(c'), N(c'), and the norms' backward sums
  std::vector<S> dg_(B * K), gdi_(B * K), gdh_(B * K), gdc_(B * H), xc_(B * H), sums(4 * n_g + 2 * n_c);
  const int threads = at::get_num_threads();
  GainSums<S> gains(K, H, threads);
  const S *a0 = G.data_ptr<S>(), *cs = Cs.data_ptr<S>(), *tc = TC.data_ptr<S>();
  const S *xi0 = Xi.data_ptr<S>(), *xh0 = Xh.data_ptr<S>();
  const S *gi = g_ih.data_ptr<S>(), *gh = g_hh.data_ptr<S>(), *gcw = g_c.data_ptr<S>();
  S *dv0 = dV.data_ptr<S>(), *dr0 = DR.data_ptr<S>(), *dcp = dc.data_ptr<S>();
  S *dg = dg_.data(), *gdi = gdi_.data(), *gdh = gdh_.data(), *gdc = gdc_.data(), *xc = xc_.data();
  S *si1 = sums.data(), *si2 = si1 + n_g, *sh1 = si2 + n_g, *sh2 = sh1 + n_g, *sc1 = sh2 + n_g, *sc2 = sc1 + n_c;
  for (int64_t t = T - 1; t >= 0; --t) {
    const S* dhp = dh.data_ptr<S>();
    const S *a = a0 + t * B * K, *c_prev = cs + t * B * H, *c_new = c_prev + B * H;
    const S *xi = xi0 + t * B * K, *xh = xh0 + t * B * K;
    const S *ri = rstd_in.data_ptr<S>() + t * n_g, *rh = rstd_hh.data_ptr<S>() + t * n_g;
    const S *mc = mean_c.data_ptr<S>() + t * n_c, *rc = rstd_c.data_ptr<S>() + t * n_c;
    auto part1 = [&](int64_t b) {
      S* acc = gains.mine();
      output_row_back<batch>(b, H, a + b * K, dg + b * K, tc + (t * B + b) * H, dhp + b * H, c_new + b * H, mc, rc,
                             gcw, gdc + b * H, xc + b * H, acc + 3 * K, acc + 3 * K + H);
    };
    auto part2 = [&](int64_t b) {
      gates_row_back<batch>(b, H, N_c, a + b * K, dg + b * K, c_prev + b * H, gdc + b * H, xc + b * H, rc, sc1, sc2,
                            dcp + b * H, gi, gh, gdi + b * K, gdh + b * K);
    };
    auto part3 = [&](int64_t b) {
      S* acc = gains.mine();
      inputs_row_back<batch>(b, K, N_g, dg + b * K, gdi + b * K, gdh + b * K, xi + b * K, xh + b * K, ri, rh, si1,
                             si2, sh1, sh2, dv0 + (t * B + b) * K, dr0 + (t * B + b) * K, acc, acc + K, acc + 2 * K);
    };
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      if constexpr (batch) {  // sums down the columns between the passes over the rows
        each_row(B, part1);
        each_block(H, [&](int64_t lo, int64_t hi) { col_sums<S>(gdc, xc, B, H, lo, hi, sc1, sc2); });
        each_row(B, part2);
        each_block(K, [&](int64_t lo, int64_t hi) {
          col_sums<S>(gdi, xi, B, K, lo, hi, si1, si2);
          col_sums<S>(gdh, xh, B, K, lo, hi, sh1, sh2);
        });
        each_row(B, part3);
      } else {  // every row on its own: one pass
        each_row(B, [&](int64_t b) {
          part1(b);
          row_sums<S>(gdc + b * H, xc + b * H, H, sc1[b], sc2[b]);
          part2(b);
          row_sums<S>(gdi + b * K, xi + b * K, K, si1[b], si2[b]);
          row_sums<S>(gdh + b * K, xh + b * K, K, sh1[b], sh2[b]);
          part3(b);
        });
      }
    }
    dh = back(DR[t]);  // dh_{t-1} = d(U h) U, plus what reaches h_{t-1} from above
    if (t > 0) dh.add_(dHs[t - 1]);
  }
  std::vector<at::Tensor> out = {dV, DR, dh, dc};
  for (auto& g : gains.totals(opt)) out.push_back(g);
  return out;
}

at::Tensor or_undefined(const std::optional<at::Tensor>& x) { return x.has_value() ? *x : at::Tensor(); }

// (W x (T, B, 4H), its norm's gain, b (both biases), h0, c0, U, U packed by oneDNN or None, the U h norm's
// gain, the c' norm's gain and shift, batch?, the running statistics of the three norms (batch norm: mean
// and variance of W x, U h, c', rows >= T), momentum, eps) -> [hs, cs (T+1), the gate activations,
// tanh(N(c')), N(W x), N(U h), their 1/std, the c' norm's mean and 1/std].
std::vector<at::Tensor> forward(const at::Tensor& V, const at::Tensor& g_ih, const at::Tensor& shift,
                                const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                                const std::optional<at::Tensor>& w_hh_packed, const at::Tensor& g_hh,
                                const at::Tensor& g_c, const at::Tensor& b_c, bool batch,
                                const std::vector<at::Tensor>& running, double momentum, double eps) {
  TORCH_CHECK(V.device().is_cpu() && V.dim() == 3 && V.stride(2) == 1 && V.size(2) % 4 == 0,
              "norm_lstm_forward: W x must be a CPU (T, B, 4H) tensor with unit feature stride");
  TORCH_CHECK(V.scalar_type() == at::kFloat || V.scalar_type() == at::kDouble,
              "norm_lstm_forward: float32 or float64 only");
  TORCH_CHECK(!batch || running.size() == 6, "norm_lstm_forward: the batch norm needs its six running statistics");
  for (size_t i = 0; batch && i < 6; ++i) {
    const int64_t width = i < 4 ? V.size(2) : V.size(2) / 4;
    TORCH_CHECK(running[i].dim() == 2 && running[i].size(0) >= V.size(0) && running[i].size(1) == width &&
                    running[i].stride(1) == 1 && running[i].scalar_type() == V.scalar_type(),
                "norm_lstm_forward: running statistic ", i, " must be (>= T, ", width, "), of W x's dtype");
  }
  const StepProduct uh{w_hh.t(), or_undefined(w_hh_packed)};
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "norm_lstm_forward", [&] {
    auto impl = batch ? forward_impl<scalar_t, true> : forward_impl<scalar_t, false>;
    out = impl(V, g_ih.contiguous(), shift.contiguous(), h0, c0, uh, g_hh.contiguous(), g_c.contiguous(),
               b_c.contiguous(), running, momentum, eps);
  });
  return out;
}

// (dL/dhs, dL/dh_T, dL/dc_T, what forward kept, U, U^T packed by oneDNN or None, the gains of W x, U h and
// c', batch?) -> [d(W x), d(U h) (T,B,4H), dh0, dc0, and the gradients of the W x gain, b, the U h gain, the
// c' gain and the c' shift].
std::vector<at::Tensor> backward(const at::Tensor& dHs, const at::Tensor& dh_T, const at::Tensor& dc_T,
                                 const at::Tensor& G, const at::Tensor& Cs, const at::Tensor& TC, const at::Tensor& Xi,
                                 const at::Tensor& Xh, const at::Tensor& rstd_in, const at::Tensor& rstd_hh,
                                 const at::Tensor& mean_c, const at::Tensor& rstd_c, const at::Tensor& w_hh,
                                 const std::optional<at::Tensor>& w_hh_t_packed, const at::Tensor& g_ih,
                                 const at::Tensor& g_hh, const at::Tensor& g_c, bool batch) {
  const StepProduct back{w_hh, or_undefined(w_hh_t_packed)};
  const at::Tensor d = dHs.contiguous();
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "norm_lstm_backward", [&] {
    auto impl = batch ? backward_impl<scalar_t, true> : backward_impl<scalar_t, false>;
    out = impl(d, dh_T, dc_T, G, Cs, TC, Xi, Xh, rstd_in, rstd_hh, mean_c, rstd_c, back, g_ih.contiguous(),
               g_hh.contiguous(), g_c.contiguous());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(charlm, m) {
  m.def(
      "norm_lstm_forward(Tensor v, Tensor g_ih, Tensor shift, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hh_packed, "
      "Tensor g_hh, Tensor g_c, Tensor b_c, bool batch, Tensor(a!)[] running, float momentum, float eps) -> Tensor[]");
  m.def(
      "norm_lstm_backward(Tensor dHs, Tensor dh_T, Tensor dc_T, Tensor G, Tensor Cs, Tensor TC, Tensor Xi, Tensor Xh, "
      "Tensor rstd_in, Tensor rstd_hh, Tensor mean_c, Tensor rstd_c, Tensor w_hh, Tensor? w_hh_t_packed, "
      "Tensor g_ih, Tensor g_hh, Tensor g_c, bool batch) -> Tensor[]");
}

// CompositeExplicitAutograd: every CPU backend key, the MkldnnCPU of a oneDNN-packed weight included.
TORCH_LIBRARY_IMPL(charlm, CompositeExplicitAutograd, m) {
  m.impl("norm_lstm_forward", TORCH_FN(forward));
  m.impl("norm_lstm_backward", TORCH_FN(backward));
}
