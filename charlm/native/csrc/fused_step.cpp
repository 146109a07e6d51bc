// CharLM.step for a stack of plain LSTM layers at a few rows (generation), in our own arithmetic: at one
// row a step is three products of a 256-vector with a 256 x 1024 matrix, and PyTorch's general matrix
// product plus a dozen small ops around it spend more time being called than computing. Here:
//
//   - layer 0's input product is a table lookup: one row per character of E W_ih^T + b_ih + b_hh (V, 4H),
//     made when the weights are packed;
//   - each matrix is packed once, transposed into column blocks of BLOCK outputs, so a product streams
//     its weights in order and keeps BLOCK sums in registers; a layer's input and recurrent products
//     are one pass per block, and the blocks are split between the threads (one parallel region a step);
//   - the gates are reordered i, f, o, g (three sigmoids, then a tanh), and the nonlinearities and the
//     cell update are one vectorised loop (fast_math.h);
//   - ``fused_lstm_sample`` draws and steps a run of characters in one call, each draw charlm.sampling.pick's
//     at a temperature with no top-k / top-p: one uniform per row from the same generator, the inverse of
//     the running sum.
//
// Every sum runs over its inputs in order with fused multiply-adds (std::fma: one instruction where the
// CPU has FMA, the exactly-rounded library call where it does not), so the result does not depend on the
// thread count or the vector width; it differs from PyTorch's products only in rounding (about 1e-6,
// held to 1e-5 by the tests). Layout of the packed list (fused_lstm_pack): [table0, w_hh0, then per further
// layer w_ih, w_hh, bias, then the decoder's weight and bias]; states come and go as (1, N, H) tensors.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "fast_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

namespace {

using charlm_math::fast_exp;
using charlm_math::sigmoid;
using charlm_math::tanh_;

#ifdef __AVX512F__
constexpr int64_t BLOCK = 128;  // outputs summed at once: 8 zmm registers of sums
#else
constexpr int64_t BLOCK = 64;  // 8 ymm (AVX2) or 16 xmm registers
#endif

// W (M, K) -> (ceil(M / BLOCK), K, BLOCK): block b holds columns b*BLOCK.. of W^T, row after row, zero past M.
at::Tensor pack_matrix(const at::Tensor& w) {
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  const int64_t m = wf.size(0), k = wf.size(1), blocks = (m + BLOCK - 1) / BLOCK;
  at::Tensor out = at::zeros({blocks, k, BLOCK}, wf.options());
  const float* src = wf.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < k; ++j) dst[((r / BLOCK) * k + j) * BLOCK + r % BLOCK] = src[r * k + j];
  return out;
}

// out[r] = init[r] + sum_j x[j] W[r, j] (+ sum_j x2[j] W2[r, j]) over block b of the packed W (and W2),
// for r < m; the sums run in order, from init.
void product_block(int64_t b, const float* init, const float* w, int64_t k, const float* x, const float* w2,
                   int64_t k2, const float* x2, float* out, int64_t m) {
  const int64_t base = b * BLOCK, width = std::min<int64_t>(BLOCK, m - base);
  float acc[BLOCK];
  for (int64_t r = 0; r < BLOCK; ++r) acc[r] = r < width ? init[base + r] : 0.0f;
  const float* p = w + b * k * BLOCK;
  for (int64_t j = 0; j < k; ++j, p += BLOCK) {
    const float xj = x[j];
    for (int64_t r = 0; r < BLOCK; ++r) acc[r] = std::fma(p[r], xj, acc[r]);
  }
  if (w2 != nullptr) {
    p = w2 + b * k2 * BLOCK;
    for (int64_t j = 0; j < k2; ++j, p += BLOCK) {
      const float xj = x2[j];
      for (int64_t r = 0; r < BLOCK; ++r) acc[r] = std::fma(p[r], xj, acc[r]);
    }
  }
  for (int64_t r = 0; r < width; ++r) out[base + r] = acc[r];
}

// (rows x blocks) of products, split between the threads of the enclosing parallel region (a barrier
// after); run by a lone thread outside one.
template <typename Fn> inline void each_block(int64_t rows, int64_t blocks, const Fn& fn) {
#pragma omp for schedule(static)
  for (int64_t t = 0; t < rows * blocks; ++t) fn(t / blocks, t % blocks);
}

// The cell update of units [0, hs) of one row, from its activated gates i, f, o, g: c' = f c + i g, h' = o tanh(c').
inline void cell_update(float* gates, const float* c0, float* c, float* h, int64_t hs) {
  for (int64_t u = 0; u < 3 * hs; ++u) gates[u] = sigmoid(gates[u]);
  for (int64_t u = 3 * hs; u < 4 * hs; ++u) gates[u] = tanh_(gates[u]);
  const float *i = gates, *f = gates + hs, *o = gates + 2 * hs, *g = gates + 3 * hs;
  for (int64_t u = 0; u < hs; ++u) {
    c[u] = std::fma(f[u], c0[u], i[u] * g[u]);
    h[u] = o[u] * tanh_(c[u]);
  }
}

// i, f, g, o (nn.LSTM's order) -> i, f, o, g, along dim 0
at::Tensor gates_ifog(const at::Tensor& t) {
  const int64_t h = t.size(0) / 4;
  return at::cat({t.narrow(0, 0, 2 * h), t.narrow(0, 3 * h, h), t.narrow(0, 2 * h, h)}, 0);
}

// [embedding (V, E), then per layer w_ih, w_hh, b_ih, b_hh, then the decoder's weight (V, H) and bias
// (or an empty tensor)] -> the packed list the step reads.
std::vector<at::Tensor> fused_lstm_pack(at::TensorList weights) {
  const int64_t layers = (static_cast<int64_t>(weights.size()) - 3) / 4;
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(weights.size()) == 3 + 4 * layers,
              "fused_lstm_pack: expected the embedding, 4 tensors per layer and the decoder's 2, got ",
              weights.size(), " tensors");
  std::vector<at::Tensor> out;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor w_ih = gates_ifog(weights[1 + 4 * l]).to(at::kFloat);
    const at::Tensor bias = gates_ifog(weights[3 + 4 * l].add(weights[4 + 4 * l])).to(at::kFloat);
    if (l == 0) {  // the table (V, 4H): row c = bias + W_ih E[c], by the step's own products
      const at::Tensor emb = weights[0].to(at::kFloat).contiguous(), packed_ih = pack_matrix(w_ih);
      const at::Tensor b = bias.contiguous();
      const int64_t vocab = emb.size(0), e = emb.size(1), g4 = w_ih.size(0);
      at::Tensor table = at::empty({vocab, g4}, emb.options());
      for (int64_t c = 0; c < vocab; ++c)
        for (int64_t blk = 0; blk < packed_ih.size(0); ++blk)
          product_block(blk, b.data_ptr<float>(), packed_ih.data_ptr<float>(), e, emb.data_ptr<float>() + c * e,
                        nullptr, 0, nullptr, table.data_ptr<float>() + c * g4, g4);
      out.push_back(table);
    } else {
      out.push_back(pack_matrix(w_ih));
    }
    out.push_back(pack_matrix(gates_ifog(weights[2 + 4 * l])));
    if (l > 0) out.push_back(bias.contiguous());
  }
  const at::Tensor& dec_b = weights[2 + 4 * layers];
  const at::Tensor& dec_w = weights[1 + 4 * layers];
  out.push_back(pack_matrix(dec_w));
  out.push_back(dec_b.numel() > 0 ? dec_b.to(at::kFloat).contiguous() : at::zeros({dec_w.size(0)}, dec_w.options().dtype(at::kFloat)));
  return out;
}

// A state tensor's data as (N, H) contiguous float (itself where it already is, a copy kept in ``keep`` else).
const float* state_data(const at::Tensor& t, int64_t n, int64_t hs, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(t.numel() == n * hs, "fused_lstm_step: a state of ", n, " x ", hs, " expected, got ", t.sizes());
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  keep.push_back(t.to(at::kFloat).contiguous());
  return keep.back().data_ptr<float>();
}

// ids (N,) -> [logits (N, V), then h, c of each layer, each (1, N, H)]; empty ``states``: the zero state.
// One parallel region per step: each layer's products split by blocks of gates, a barrier, the cell
// updates split by rows, a barrier; then the decoder's blocks.
std::vector<at::Tensor> fused_lstm_step(const at::Tensor& ids, at::TensorList states, at::TensorList packed) {
  const int64_t layers = (static_cast<int64_t>(packed.size()) - 1) / 3;
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(packed.size()) == 3 * layers + 1, "fused_lstm_step: a ",
              "packed list of fused_lstm_pack expected, got ", packed.size(), " tensors");
  TORCH_CHECK(states.empty() || static_cast<int64_t>(states.size()) == 2 * layers, "fused_lstm_step: ",
              2 * layers, " state tensors expected, got ", states.size());
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "fused_lstm_step: ids (N,) of int64 expected");
  const int64_t n = ids.size(0);
  const at::Tensor& table = packed[0];
  const int64_t vocab = table.size(0);
  const auto opts = table.options();
  const at::Tensor id = ids.contiguous();
  const int64_t* id_data = id.data_ptr<int64_t>();
  for (int64_t row = 0; row < n; ++row)
    TORCH_CHECK(id_data[row] >= 0 && id_data[row] < vocab, "fused_lstm_step: id ", id_data[row],
                " is outside the vocabulary of ", vocab);
  // every layer's pointers, worked out before the parallel region (no ATen calls inside it)
  std::vector<at::Tensor> out(1 + 2 * layers), keep;
  std::vector<const float*> h0(layers), c0(layers), w_ih(layers), w_hh(layers), bias(layers);
  std::vector<int64_t> hs(layers), k_in(layers);
  std::vector<float> zeros;
  int64_t widest = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor& whh = packed[l == 0 ? 1 : 3 * l];
    hs[l] = whh.size(1);
    widest = std::max(widest, hs[l]);
    w_hh[l] = whh.data_ptr<float>();
    w_ih[l] = l == 0 ? nullptr : packed[3 * l - 1].data_ptr<float>();
    k_in[l] = l == 0 ? 0 : packed[3 * l - 1].size(1);
    bias[l] = l == 0 ? nullptr : packed[3 * l + 1].data_ptr<float>();
    out[1 + 2 * l] = at::empty({1, n, hs[l]}, opts);
    out[2 + 2 * l] = at::empty({1, n, hs[l]}, opts);
  }
  if (states.empty()) zeros.assign(n * widest, 0.0f);
  for (int64_t l = 0; l < layers; ++l) {
    h0[l] = states.empty() ? zeros.data() : state_data(states[2 * l], n, hs[l], keep);
    c0[l] = states.empty() ? zeros.data() : state_data(states[2 * l + 1], n, hs[l], keep);
  }
  const at::Tensor &dec_w = packed[packed.size() - 2], &dec_b = packed[packed.size() - 1];
  const int64_t v = dec_b.size(0), dec_blocks = dec_w.size(0), dec_k = dec_w.size(1);
  out[0] = at::empty({n, v}, opts);
  float* logits = out[0].data_ptr<float>();
  const float *dec_wp = dec_w.data_ptr<float>(), *dec_bp = dec_b.data_ptr<float>(), *tab = table.data_ptr<float>();
  std::vector<float> gates(n * 4 * widest);
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t h = hs[l], g4 = 4 * h, blocks = (g4 + BLOCK - 1) / BLOCK;
      const float* x = l == 0 ? nullptr : out[2 * l - 1].data_ptr<float>();  // the layer below's h'
      each_block(n, blocks, [&](int64_t row, int64_t b) {
        float* g = gates.data() + row * g4;
        if (l == 0) {
          product_block(b, tab + id_data[row] * g4, w_hh[0], h, h0[0] + row * h, nullptr, 0, nullptr, g, g4);
        } else {
          product_block(b, bias[l], w_ih[l], k_in[l], x + row * k_in[l], w_hh[l], h, h0[l] + row * h, g, g4);
        }
      });
      float *hp = out[1 + 2 * l].data_ptr<float>(), *cp = out[2 + 2 * l].data_ptr<float>();
#pragma omp for schedule(static)
      for (int64_t row = 0; row < n; ++row)
        cell_update(gates.data() + row * g4, c0[l] + row * h, cp + row * h, hp + row * h, h);
    }
    const float* x = out[2 * layers - 1].data_ptr<float>();
    each_block(n, dec_blocks, [&](int64_t row, int64_t b) {
      product_block(b, dec_bp, dec_wp, dec_k, x + row * dec_k, nullptr, 0, nullptr, logits + row * v, v);
    });
  }
  return out;
}

// Draw one id per row of ``scores`` (N, V, contiguous float) at ``temperature`` > 0 as charlm.sampling.pick
// does with no top-k or top-p: one uniform u in [0, 1) per row from the generator (the draw of
// torch.rand(N, dtype=float64), so it consumes the generator alike), then the first character whose
// running sum (in double) of exp((score - max) / T) exceeds u times the whole sum. A score of -inf is never
// drawn; NaN, +inf or no finite score at all: an error saying so (as pick's).
void draw(const float* scores, int64_t n, int64_t v, double temperature, at::CPUGeneratorImpl* gen, int64_t* id) {
  std::vector<float> e(v);
  const float t = static_cast<float>(temperature);
  for (int64_t row = 0; row < n; ++row) {
    const float* l = scores + row * v;
    float top = -std::numeric_limits<float>::infinity();
    bool usable = true;  // -inf is a character ruled out; NaN and +inf are not scores
    for (int64_t k = 0; k < v; ++k) {
      usable = usable && l[k] < std::numeric_limits<float>::infinity();  // false for NaN too
      top = std::max(top, l[k]);
    }
    TORCH_CHECK(usable && std::isfinite(top), "fused_lstm_sample: scores that are not finite numbers");
    for (int64_t k = 0; k < v; ++k) e[k] = fast_exp((l[k] - top) / t);
    double total = 0.0;
    for (int64_t k = 0; k < v; ++k) total += e[k];
    double u;
    {
      std::lock_guard<std::mutex> lock(gen->mutex_);
      at::uniform_real_distribution<double> uniform(0.0, 1.0);
      u = uniform(gen);
    }
    const double target = u * total;
    double sum = 0.0;
    int64_t pick = v - 1;
    for (int64_t k = 0; k < v; ++k) {
      sum += e[k];
      if (sum > target) {
        pick = k;
        break;
      }
    }
    id[row] = pick;
  }
}

// ``length`` characters drawn and stepped in turn from ``logits`` (N, V) and ``states``: -> [ids (length, N),
// the scores each row of ids was drawn from (length, N, V), then fused_lstm_step's list after the last].
std::vector<at::Tensor> fused_lstm_sample(const at::Tensor& logits, double temperature, at::TensorList states,
                                          at::TensorList packed, int64_t length,
                                          std::optional<at::Generator> generator) {
  TORCH_CHECK(logits.dim() == 2 && length >= 1, "fused_lstm_sample: logits (N, V) and a length >= 1 expected");
  const int64_t n = logits.size(0), v = logits.size(1);
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  at::Tensor ids = at::empty({length, n}, logits.options().dtype(at::kLong));
  at::Tensor scores = at::empty({length, n, v}, logits.options().dtype(at::kFloat));
  std::vector<at::Tensor> out;
  at::Tensor current = logits.to(at::kFloat).contiguous();
  std::vector<at::Tensor> carried(states.begin(), states.end());
  for (int64_t t = 0; t < length; ++t) {
    float* row_scores = scores.data_ptr<float>() + t * n * v;
    std::copy_n(current.data_ptr<float>(), n * v, row_scores);
    draw(row_scores, n, v, temperature, gen, ids.data_ptr<int64_t>() + t * n);
    out = fused_lstm_step(ids.select(0, t), carried, packed);
    current = out[0];
    carried.assign(out.begin() + 1, out.end());
  }
  out.insert(out.begin(), {ids, scores});
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(charlm, m) {
  m.def("fused_lstm_pack(Tensor[] weights) -> Tensor[]");
  m.def("fused_lstm_step(Tensor ids, Tensor[] states, Tensor[] packed) -> Tensor[]");
  m.def("fused_lstm_sample(Tensor logits, float temperature, Tensor[] states, Tensor[] packed, int length, "
        "Generator? generator=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(charlm, CompositeExplicitAutograd, m) {
  m.impl("fused_lstm_pack", TORCH_FN(fused_lstm_pack));
  m.impl("fused_lstm_step", TORCH_FN(fused_lstm_step));
  m.impl("fused_lstm_sample", TORCH_FN(fused_lstm_sample));
}
