// CharLM.step in one call (embedding, every recurrent layer, its norm, the decoder), for the cells whose
// step is a fixed sequence of ATen ops. At one row a step is a few dozen small ATen calls; from Python each pays the interpreter
// and the dispatcher's Python entry, which is most of the step's time. Here the same ATen functions
// are called in the same order with the same arguments, so the results are the Python step's bit for
// bit (the tests hold both ops to the Python code), on any device and dtype ATen runs them in.
//
// The model's tensors come as one flat list: the embedding, the decoder's weight and bias, then per
// layer w_ih, w_hh, b_ih, b_hh, peephole, norm weight, norm bias (an empty tensor where a layer has
// none). A layer's kind is the torch RNN cell op it runs (LSTM, GRU, RNN tanh / relu) or GATED, the
// gated-LSTM family of charlm/cells/lstm.py (GatedLSTMCell.step), with its parts as bit flags.
// (only the headers of the ops used: the whole of ATen.h triples the build time)
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/gru_cell.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/lstm_cell.h>
#include <ATen/ops/rnn_relu_cell.h>
#include <ATen/ops/rnn_tanh_cell.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace {

enum Kind : int64_t { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3, GATED = 4 };
// GateConfig's fields (charlm/cells/lstm.py), as the bits of a GATED layer's flags
enum Gate : int64_t { INPUT = 1, FORGET = 2, OUTPUT = 4, COUPLED = 8, G_TANH = 16, OUT_TANH = 32, PEEP = 64 };
constexpr int64_t PER_LAYER = 7;

int64_t num_states(int64_t kind) { return kind == LSTM || kind == GATED ? 2 : 1; }

// GatedLSTMCell.project + GatedLSTMCell.step, op for op.
std::tuple<at::Tensor, at::Tensor> gated_step(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                              const at::Tensor* w, int64_t flags) {
  const at::Tensor &w_ih = w[0], &w_hh = w[1], &b_ih = w[2], &b_hh = w[3], &peep = w[4];
  const int64_t hs = w_hh.size(1);
  const at::Tensor xw = at::linear(x.unsqueeze(0), w_ih, b_ih.add(b_hh)).select(0, 0);
  const at::Tensor gates = at::addmm(xw, h, w_hh.t());
  // the blocks present, in nn.LSTM order i, f, g, o; the peephole blocks in order i, f, o
  const bool has_i = flags & INPUT, has_f = (flags & FORGET) && !(flags & COUPLED), has_o = flags & OUTPUT;
  const bool peephole = flags & PEEP;
  int64_t k = 0, pk = 0;
  auto block = [&](bool present) { return present ? gates.slice(1, hs * k, hs * (k + 1)) : at::Tensor(); };
  const at::Tensor a_i = block(has_i);
  k += has_i;
  const at::Tensor a_f = block(has_f);
  k += has_f;
  const at::Tensor a_g = block(true);
  k += 1;
  const at::Tensor a_o = block(has_o);
  const int64_t p_i = has_i ? pk++ : -1, p_f = has_f ? pk++ : -1, p_o = has_o ? pk++ : -1;
  auto pre = [&](const at::Tensor& a, int64_t p, const at::Tensor& cell) {
    return peephole ? a.add(peep.slice(0, p * hs, (p + 1) * hs).mul(cell)) : a;
  };
  const at::Tensor i = has_i ? at::sigmoid(pre(a_i, p_i, c)) : at::Tensor();
  at::Tensor f;
  if (has_f) {
    f = at::sigmoid(pre(a_f, p_f, c));
  } else if (flags & COUPLED) {
    f = at::rsub(i, 1.0);
  }
  const at::Tensor g = (flags & G_TANH) ? at::tanh(a_g) : a_g;
  at::Tensor c_new = f.defined() ? f.mul(c) : c;
  c_new = i.defined() ? c_new.add(i.mul(g)) : c_new.add(g);
  const at::Tensor a = (flags & OUT_TANH) ? at::tanh(c_new) : c_new;
  const at::Tensor h_new = has_o ? at::sigmoid(pre(a_o, p_o, c_new)).mul(a) : a;
  return {h_new, c_new};
}

// CharLM.step: x (N,) ids -> [logits (N, V), the new states, each (1, N, S), layer by layer]. Empty
// ``states``: the zero state (RecurrentLayer.initial_state).
std::vector<at::Tensor> model_step(const at::Tensor& x, at::TensorList states, at::TensorList weights,
                                   at::IntArrayRef kinds, at::IntArrayRef flags, double norm_eps) {
  const int64_t layers = static_cast<int64_t>(kinds.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 3 + PER_LAYER * layers, "model_step: weights for ",
              layers, " layers expected, got ", weights.size(), " tensors");
  at::Tensor h = at::embedding(weights[0], x, -1, false, false);
  std::vector<at::Tensor> out;
  out.reserve(1 + 2 * layers);
  out.emplace_back();  // the logits, last
  size_t s = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + 3 + PER_LAYER * l;
    const int64_t kind = kinds[l], hs = w[1].size(1);
    at::Tensor h0, c0;
    if (states.empty()) {
      h0 = at::zeros({x.size(0), hs}, h.options());
      c0 = num_states(kind) == 2 ? at::zeros({x.size(0), hs}, h.options()) : at::Tensor();
    } else {
      TORCH_CHECK(states.size() >= s + num_states(kind), "model_step: too few state tensors");
      h0 = states[s].select(0, 0);
      c0 = num_states(kind) == 2 ? states[s + 1].select(0, 0) : at::Tensor();
      s += num_states(kind);
    }
    at::Tensor c;
    switch (kind) {
      case LSTM: std::tie(h, c) = at::lstm_cell(h, {h0, c0}, w[0], w[1], w[2], w[3]); break;
      case GRU: h = at::gru_cell(h, h0, w[0], w[1], w[2], w[3]); break;
      case RNN_TANH: h = at::rnn_tanh_cell(h, h0, w[0], w[1], w[2], w[3]); break;
      case RNN_RELU: h = at::rnn_relu_cell(h, h0, w[0], w[1], w[2], w[3]); break;
      case GATED: std::tie(h, c) = gated_step(h, h0, c0, w, flags[l]); break;
      default: TORCH_CHECK(false, "model_step: unknown layer kind ", kind);
    }
    out.push_back(h.unsqueeze(0));
    if (c.defined()) out.push_back(c.unsqueeze(0));
    if (w[5].numel() > 0) h = at::layer_norm(h, {h.size(-1)}, w[5], w[6], norm_eps);
  }
  out[0] = at::linear(h, weights[1], weights[2].numel() > 0 ? std::optional<at::Tensor>(weights[2]) : std::nullopt);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(charlm, m) {
  m.def("model_step(Tensor x, Tensor[] states, Tensor[] weights, int[] kinds, int[] flags, float norm_eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(charlm, CompositeExplicitAutograd, m) {
  m.impl("model_step", TORCH_FN(model_step));
}
