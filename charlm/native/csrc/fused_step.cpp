// CharLM.step for generation in our own arithmetic, for the gated cells (the LSTM family, GRU, the
// layer-normalised LSTM, the Mogrifier): at a few rows a step is a handful of (rows, K) x (K, G) products,
// and PyTorch's general matrix product plus a dozen small ops around it spend more time being called than
// computing. Here:
//
//   - each matrix is packed once, transposed into column blocks of BLOCK outputs, so a product streams its
//     weights in order and keeps BLOCK sums in registers (fused_pack_matrix);
//   - a layer's products are "segments": a range of its gate buffer summed from an initial vector (a bias,
//     or a row of layer 0's table: one row per character of E W_ih^T + b, made by these same products),
//     the packed input weights times x and the packed recurrent weights times h; the blocks of every segment
//     and every tile of rows are split between the threads (one parallel region a step; fused_products.h);
//   - rows are taken in tiles of 6, 4, 2 or 1: a tile reads each weight once for all its rows, keeping up to
//     12 vectors of sums in registers, so many streams cost little more weight traffic than one;
//   - each cell's update (the gates' nonlinearities, the state update, layer norms) is a few vectorised
//     loops per row (cell_updates.h, with fast_math.h), then the decoder is one more product;
//   - fused_sample draws and steps a run of characters in one call, each draw charlm.generation.options.pick's
//     at a temperature with no top-k / top-p: one uniform per row from the same generator, the inverse of
//     the running sum.
//
// Every sum runs over its inputs in order (madd: one fused multiply-add where the CPU has FMA, else a
// multiply and an add), so a result does not depend on the thread count, the tile or the vector width; it
// differs from PyTorch's step only in rounding (held to 1e-5 by the tests).
//
// What the step reads is described by ``layout`` (ints) and ``tensors``, made by charlm/model/fused_step.py:
//   layout = [layers, then per layer: kind, flags, H, input size, Mogrifier rounds, segments S, then S times
//            (first output, outputs, table column or -1)]
//   tensors = [decoder weight (packed), decoder bias, layer 0's table (V, G) or empty, the embedding (V, E,
//             the Mogrifier's layer 0 reads it) or empty, then per layer: per segment (initial vector or
//             empty, packed input weights or empty, packed recurrent weights or empty), then its extras: the
//             peephole weights (PEEP), or the norms' gains and shifts (NORM_LSTM: g_ih, g_hh, b, g_c, b_c), or
//             the rounds' halved matrices packed one after another in one flat tensor (MOGRIFIER); then the
//             LayerNorm's weight and bias (LAYER_NORM, eps 1e-5 as nn.LayerNorm's default)]
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cell_updates.h"
#include "fast_math.h"
#include "fused_products.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

namespace {

using namespace charlm_fused;  // the products (fused_products.h) and the cell updates (cell_updates.h)
using charlm_math::fast_exp;
using charlm_math::madd;
using charlm_math::tanh_;

// W (M, K) -> (ceil(M / BLOCK), K, BLOCK): block b holds columns b*BLOCK.. of W^T, row after row, zero past M.
at::Tensor fused_pack_matrix(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "fused_pack_matrix: a matrix expected, got ", w.sizes());
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  const int64_t m = wf.size(0), k = wf.size(1), blocks = (m + BLOCK - 1) / BLOCK;
  at::Tensor out = at::zeros({blocks, k, BLOCK}, wf.options());
  const float* src = wf.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < k; ++j) dst[((r / BLOCK) * k + j) * BLOCK + r % BLOCK] = src[r * k + j];
  return out;
}

// ------------------------------------------------------------------------------------------ the step
struct Segment {
  int64_t first, outputs, table;  // gate buffer columns [first, first + outputs); table column or -1
  const float* init;
  Operands op;
  int64_t blocks;
};

struct Layer {
  int64_t kind, flags, hs, k_in, buffer = 0;
  std::vector<Segment> segments;
  const float* peep = nullptr;  // PEEP
  const float* norm[5] = {};  // NORM_LSTM: g_ih, g_hh, b, g_c, b_c
  const float* rounds = nullptr;  // MOGRIFIER: the halved matrices, packed, one after another
  int64_t num_rounds = 0;
  const float* out_w = nullptr;  // LAYER_NORM
  const float* out_b = nullptr;
};

int64_t num_states(int64_t kind) { return kind == GRU ? 1 : 2; }

// The layout and tensors (see the top of this file) read into layers; tensors must outlive them.
std::vector<Layer> read_layout(at::IntArrayRef layout, at::TensorList tensors) {
  auto data = [](const at::Tensor& t) -> const float* {
    if (t.numel() == 0) return nullptr;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "fused_step: float32 contiguous tensors expected");
    return t.data_ptr<float>();
  };
  TORCH_CHECK(!layout.empty() && layout[0] >= 1, "fused_step: a layout of fused_step.py expected");
  std::vector<Layer> layers(layout[0]);
  size_t at = 1, t = 4;
  auto next = [&]() -> const float* {
    TORCH_CHECK(t < tensors.size(), "fused_step: fewer tensors than the layout describes");
    return data(tensors[t++]);
  };
  for (Layer& layer : layers) {
    TORCH_CHECK(at + 6 <= layout.size(), "fused_step: the layout is cut short");
    layer.kind = layout[at];
    layer.flags = layout[at + 1];
    layer.hs = layout[at + 2];
    layer.k_in = layout[at + 3];
    layer.num_rounds = layout[at + 4];
    const int64_t segments = layout[at + 5];
    at += 6;
    for (int64_t s = 0; s < segments; ++s, at += 3) {
      Segment seg{layout[at], layout[at + 1], layout[at + 2], nullptr, {}, 0};
      const at::Tensor &w = tensors[t + 1], &u = tensors[t + 2];
      seg.init = next();
      seg.op.w = next();
      seg.op.k = w.numel() ? w.size(1) : 0;
      seg.op.u = next();
      seg.op.k2 = u.numel() ? u.size(1) : 0;
      seg.op.m = seg.outputs;
      seg.blocks = (seg.outputs + BLOCK - 1) / BLOCK;
      layer.buffer = std::max(layer.buffer, seg.first + seg.outputs);
      layer.segments.push_back(seg);
    }
    if (layer.flags & PEEP) layer.peep = next();
    if (layer.kind == NORM_LSTM)
      for (auto& part : layer.norm) part = next();
    if (layer.kind == MOGRIFIER) layer.rounds = next();
    if (layer.flags & LAYER_NORM) {
      layer.out_w = next();
      layer.out_b = next();
    }
  }
  TORCH_CHECK(t == tensors.size(), "fused_step: the layout describes ", t, " tensors, ", tensors.size(), " given");
  return layers;
}

// A state tensor's data as (N, H) contiguous float (itself where it already is, a copy kept in ``keep`` else).
const float* state_data(const at::Tensor& t, int64_t n, int64_t hs, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(t.numel() == n * hs, "fused_step: a state of ", n, " x ", hs, " expected, got ", t.sizes());
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  keep.push_back(t.to(at::kFloat).contiguous());
  return keep.back().data_ptr<float>();
}

// ids (N,) -> [logits (N, V), then each layer's new state tensors, each (1, N, H)]; empty ``states``: the
// zero state. One parallel region: per layer (the Mogrifier's rounds first, each a product then its gating)
// the segments' blocks of every row tile, a barrier, the updates split by rows, a barrier; then the decoder.
std::vector<at::Tensor> fused_step(const at::Tensor& ids, at::TensorList states, at::TensorList tensors,
                                   at::IntArrayRef layout) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "fused_step: ids (N,) of int64 expected");
  const std::vector<Layer> layers = read_layout(layout, tensors);
  const int64_t n = ids.size(0), count = static_cast<int64_t>(layers.size());
  const at::Tensor &dec_w = tensors[0], &dec_b = tensors[1], &table = tensors[2], &embedding = tensors[3];
  const auto opts = dec_b.options();
  const at::Tensor id = ids.contiguous();
  const int64_t* id_data = id.data_ptr<int64_t>();
  const int64_t vocab = table.numel() ? table.size(0) : embedding.size(0);
  for (int64_t row = 0; row < n; ++row)
    TORCH_CHECK(id_data[row] >= 0 && id_data[row] < vocab, "fused_step: id ", id_data[row],
                " is outside the vocabulary of ", vocab);
  int64_t expected = 0;
  for (const Layer& layer : layers) expected += num_states(layer.kind);
  TORCH_CHECK(states.empty() || static_cast<int64_t>(states.size()) == expected, "fused_step: ", expected,
              " state tensors expected, got ", states.size());
  // every layer's pointers and buffers, worked out before the parallel region (no ATen calls inside it)
  std::vector<at::Tensor> out(1), keep;
  std::vector<const float*> h0(count), c0(count);
  std::vector<float*> h1(count), c1(count), y(count);
  std::vector<std::vector<float>> norm_out(count);
  int64_t widest = 1, buffer = 1, mog = 1;
  size_t s = 0;
  for (int64_t l = 0; l < count; ++l) {
    const Layer& layer = layers[l];
    const int64_t hs = layer.hs;
    widest = std::max(widest, hs);
    buffer = std::max(buffer, layer.buffer);
    if (layer.kind == MOGRIFIER) mog = std::max(mog, std::max(hs, layer.k_in));
    out.push_back(at::empty({1, n, hs}, opts));
    h1[l] = out.back().data_ptr<float>();
    if (num_states(layer.kind) == 2) {
      out.push_back(at::empty({1, n, hs}, opts));
      c1[l] = out.back().data_ptr<float>();
    }
    if (!states.empty()) {
      h0[l] = state_data(states[s++], n, hs, keep);
      if (num_states(layer.kind) == 2) c0[l] = state_data(states[s++], n, hs, keep);
    }
    if (layer.flags & LAYER_NORM) {
      norm_out[l].resize(n * hs);
      y[l] = norm_out[l].data();
    } else {
      y[l] = h1[l];
    }
  }
  std::vector<float> zeros;
  if (states.empty()) {
    zeros.assign(n * widest, 0.0f);
    for (int64_t l = 0; l < count; ++l) h0[l] = c0[l] = zeros.data();
  }
  out[0] = at::empty({n, dec_b.size(0)}, opts);
  float* logits = out[0].data_ptr<float>();
  const Operands dec{dec_w.data_ptr<float>(), dec_w.size(1), nullptr, 0, dec_b.size(0)};
  const int64_t dec_blocks = dec_w.size(0);
  const float* dec_bias = dec_b.data_ptr<float>();
  const float* tab = table.numel() ? table.data_ptr<float>() : nullptr;
  const int64_t tab_width = table.numel() ? table.size(1) : 0;
  const float* emb = embedding.numel() ? embedding.data_ptr<float>() : nullptr;
  const int64_t emb_width = embedding.numel() ? embedding.size(1) : 0;
  std::vector<float> gates(n * buffer), mog_x(n * mog), mog_h(n * mog), mog_t(n * mog);
  const auto tiles = row_tiles(n);
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    for (int64_t l = 0; l < count; ++l) {
      const Layer& layer = layers[l];
      const int64_t hs = layer.hs, kin = layer.k_in;
      // the layer's input rows: layer 0 reads the table (or, the Mogrifier, the embedding); others y[l - 1]
      auto input = [&](int64_t row) -> const float* {
        if (l > 0) return y[l - 1] + row * kin;
        return emb != nullptr ? emb + id_data[row] * emb_width : nullptr;
      };
      auto x_row = [&](int64_t row) -> const float* {
        return layer.kind == MOGRIFIER ? mog_x.data() + row * mog : input(row);
      };
      auto h_row = [&](int64_t row) -> const float* {
        return layer.kind == MOGRIFIER ? mog_h.data() + row * mog : h0[l] + row * hs;
      };
      if (layer.kind == MOGRIFIER) {
#pragma omp for schedule(static)
        for (int64_t row = 0; row < n; ++row) {
          std::copy_n(input(row), kin, mog_x.data() + row * mog);
          std::copy_n(h0[l] + row * hs, hs, mog_h.data() + row * mog);
        }
        const float* mat = layer.rounds;
        for (int64_t i = 1; i <= layer.num_rounds; ++i) {
          // odd rounds: x = x + x tanh((Q/2) h) (Q: k_in x H); even: h = h + h tanh((R/2) x) (R: H x k_in)
          const bool odd = i % 2 == 1;
          const int64_t rows_out = odd ? kin : hs, k = odd ? hs : kin, blocks = (rows_out + BLOCK - 1) / BLOCK;
          const Operands op{mat, k, nullptr, 0, rows_out};
          std::vector<float>& from = odd ? mog_h : mog_x;
          each_item(ntiles * blocks, [&](int64_t t) {
            const auto [first, rows] = tiles[t / blocks];
            product_block(t % blocks, op, first, rows, [](int64_t) -> const float* { return nullptr; },
                          [&](int64_t row) -> const float* { return from.data() + row * mog; },
                          [](int64_t) -> const float* { return nullptr; },
                          [&](int64_t row) { return mog_t.data() + row * mog; });
          });
          std::vector<float>& to = odd ? mog_x : mog_h;
#pragma omp for schedule(static)
          for (int64_t row = 0; row < n; ++row) {
            float* v = to.data() + row * mog;
            const float* a = mog_t.data() + row * mog;
            for (int64_t u = 0; u < rows_out; ++u) v[u] = madd(v[u], tanh_(a[u]), v[u]);
          }
          mat += ((rows_out + BLOCK - 1) / BLOCK) * k * BLOCK;
        }
      }
      int64_t items = 0;
      for (const Segment& seg : layer.segments) items += seg.blocks;
      each_item(ntiles * items, [&](int64_t t) {
        const auto [first, rows] = tiles[t / items];
        int64_t b = t % items;
        const Segment* seg = layer.segments.data();
        while (b >= seg->blocks) b -= (seg++)->blocks;
        product_block(
            b, seg->op, first, rows,
            [&](int64_t row) -> const float* {
              return seg->table >= 0 ? tab + id_data[row] * tab_width + seg->table : seg->init;
            },
            x_row, h_row, [&](int64_t row) { return gates.data() + row * buffer + seg->first; });
      });
#pragma omp for schedule(static)
      for (int64_t row = 0; row < n; ++row) {
        float* a = gates.data() + row * buffer;
        const float* c_in = c0[l] == nullptr ? nullptr : c0[l] + row * hs;
        float* h = h1[l] + row * hs;
        switch (layer.kind) {
          case GRU: gru_update(a, h0[l] + row * hs, h, hs); break;
          case NORM_LSTM: norm_lstm_update(layer.flags, a, layer.norm, c_in, c1[l] + row * hs, h, hs); break;
          case MOGRIFIER:  // a plain LSTM on the rounds' x and h
            gated_update(INPUT | FORGET | OUTPUT | G_TANH | OUT_TANH, a, nullptr, c_in, c1[l] + row * hs, h, hs);
            break;
          default: gated_update(layer.flags, a, layer.peep, c_in, c1[l] + row * hs, h, hs);
        }
        if (layer.flags & LAYER_NORM) layer_norm(h, hs, 1e-5, layer.out_w, layer.out_b, y[l] + row * hs);
      }
    }
    const float* last = y[count - 1];
    const int64_t k = layers[count - 1].hs;
    each_item(ntiles * dec_blocks, [&](int64_t t) {
      const auto [first, rows] = tiles[t / dec_blocks];
      product_block(t % dec_blocks, dec, first, rows, [&](int64_t) { return dec_bias; },
                    [&](int64_t row) { return last + row * k; }, [](int64_t) -> const float* { return nullptr; },
                    [&](int64_t row) { return logits + row * dec.m; });
    });
  }
  return out;
}

// rows (R, K) of ``x`` through the packed ``w`` from ``init`` (M,): the products of the step, for layer 0's
// table (R = the vocabulary), so the table holds what the step would compute.
at::Tensor fused_products(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& init) {
  const at::Tensor xf = x.to(at::kFloat).contiguous(), b = init.to(at::kFloat).contiguous();
  const int64_t rows = xf.size(0), m = b.size(0), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) == xf.size(1) && blocks == (m + BLOCK - 1) / BLOCK, "fused_products: shapes differ");
  at::Tensor out = at::empty({rows, m}, xf.options());
  const Operands op{packed.data_ptr<float>(), xf.size(1), nullptr, 0, m};
  const float *xp = xf.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t blk = 0; blk < blocks; ++blk)
      product_block(blk, op, row, 1, [&](int64_t) { return bp; }, [&](int64_t r) { return xp + r * op.k; },
                    [](int64_t) -> const float* { return nullptr; }, [&](int64_t r) { return o + r * m; });
  return out;
}

// Draw one id per row of ``scores`` (N, V, contiguous float) at ``temperature`` > 0 as
// charlm.generation.options.pick does with no top-k or top-p: one uniform u in [0, 1) per row from the
// generator (the draw of torch.rand(N, dtype=float64), so it consumes the generator alike), then the first
// character whose running sum (in double) of exp((score - max) / T) exceeds u times the whole sum. A score
// of -inf weighs exactly 0 (never drawn, even at u = 0); NaN, +inf or no finite score at all: an error
// saying so (as pick's).
void draw(const float* scores, int64_t n, int64_t v, double temperature, at::CPUGeneratorImpl* gen, int64_t* id) {
  std::vector<float> e(v);
  const float t = static_cast<float>(temperature);
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t row = 0; row < n; ++row) {
    const float* l = scores + row * v;
    float top = ninf;
    bool usable = true;  // -inf is a character ruled out; NaN and +inf are not scores
    for (int64_t k = 0; k < v; ++k) {
      usable = usable && l[k] < std::numeric_limits<float>::infinity();  // false for NaN too
      top = std::max(top, l[k]);
    }
    TORCH_CHECK(usable && std::isfinite(top), "fused_sample: scores that are not finite numbers");
    for (int64_t k = 0; k < v; ++k) e[k] = l[k] == ninf ? 0.0f : fast_exp((l[k] - top) / t);
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
    int64_t pick = -1;
    for (int64_t k = 0; k < v; ++k) {
      sum += e[k];
      if (e[k] > 0.0f) pick = k;  // the last drawable one, should rounding leave the sum short of the target
      if (sum > target && e[k] > 0.0f) break;
    }
    id[row] = pick;
  }
}

// ``length`` characters drawn and stepped in turn from ``logits`` (N, V) and ``states``: -> [ids (length, N),
// the scores each row of ids was drawn from (length, N, V), then fused_step's list after the last].
std::vector<at::Tensor> fused_sample(const at::Tensor& logits, double temperature, at::TensorList states,
                                     at::TensorList tensors, at::IntArrayRef layout, int64_t length,
                                     std::optional<at::Generator> generator) {
  TORCH_CHECK(logits.dim() == 2 && length >= 1, "fused_sample: logits (N, V) and a length >= 1 expected");
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
    out = fused_step(ids.select(0, t), carried, tensors, layout);
    current = out[0];
    carried.assign(out.begin() + 1, out.end());
  }
  out.insert(out.begin(), {ids, scores});
  return out;
}

// (BLOCK, whether the products are vectorised with fused multiply-adds here): the packing's block and how
// this build of the library computes.
std::vector<int64_t> fused_build() {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  const int64_t fma = 1;
#else
  const int64_t fma = 0;
#endif
  return {BLOCK, fma};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(charlm, m) {
  m.def("fused_build() -> int[]", TORCH_FN(fused_build));
  m.def("fused_pack_matrix(Tensor w) -> Tensor");
  m.def("fused_products(Tensor x, Tensor packed, Tensor init) -> Tensor");
  m.def("fused_step(Tensor ids, Tensor[] states, Tensor[] tensors, int[] layout) -> Tensor[]");
  m.def("fused_sample(Tensor logits, float temperature, Tensor[] states, Tensor[] tensors, int[] layout, "
        "int length, Generator? generator=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(charlm, CompositeExplicitAutograd, m) {
  m.impl("fused_pack_matrix", TORCH_FN(fused_pack_matrix));
  m.impl("fused_products", TORCH_FN(fused_products));
  m.impl("fused_step", TORCH_FN(fused_step));
  m.impl("fused_sample", TORCH_FN(fused_sample));
}
