"""charlm gradients: the one-backward measurement equals a direct autograd computation per lag, clipping
does what the docs say, and the command writes a CSV and a PNG with finite values for every k."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config import ModelConfig
from charlm.model.char_lm import CharLM
from charlm.tools.gradients.measure import reinit_recurrent, state_gradient_norms
from charlm.util.errors import CharlmError

runner = CliRunner()
V, T = 11, 12  # vocabulary, measured steps minus one (K = T)


def _model(cell: str) -> CharLM:
    torch.manual_seed(0)
    config = ModelConfig(cell=cell, embedding_size=6, hidden_size=7, num_layers=1, dropout=0.0, dropouth=0.0,
                         tie_weights=False)
    return CharLM(V, config).double().eval()


def _windows(n: int, length: int) -> torch.Tensor:
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(1))


def _direct_norm(model: CharLM, window: torch.Tensor, warmup: int, k: int) -> float:
    """|d loss_T / d h_(T-k)| the slow way: run the torch cell ops to T - k, make h there a leaf, run on from
    it to T and backpropagate once."""
    layer = model.layers[0]
    w = (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
    x = model.encoder(window[None])[0]  # (L, E)
    lstm = layer.num_states == 2
    h = torch.zeros(1, 7, dtype=torch.float64)
    c = torch.zeros(1, 7, dtype=torch.float64)
    steps = x.shape[0] - 1  # the last character is the target
    leaf_at = steps - 1 - k
    leaf = None
    for t in range(steps):
        if lstm:
            h, c = torch.lstm_cell(x[t : t + 1], (h, c), *w)
        else:
            h = torch.rnn_tanh_cell(x[t : t + 1], h, *w)
        if t == leaf_at:
            h = leaf = h.detach().requires_grad_(True)
            c = c.detach()
    loss = F.cross_entropy(model.decoder(h), window[-1:])
    (grad,) = torch.autograd.grad(loss, [leaf])
    return float(grad.norm())


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_one_backward_equals_a_direct_computation_per_lag(cell: str) -> None:
    model = _model(cell)
    warmup = 3
    windows = _windows(2, warmup + T + 2)
    norms = state_gradient_norms(model, windows, warmup=warmup)
    assert norms.shape == (1, T + 1, 2)
    for n in range(2):
        for k in (0, 1, 5, T):
            assert norms[0, k, n].item() == pytest.approx(_direct_norm(model, windows[n], warmup, k), rel=1e-9)


def test_clipping_clips_what_each_step_passes_back() -> None:
    """The linear cell, h_(t+1) = A h_t + B x + b: the gradient arriving at h_(t-1) is A^T clip(g_t), where g_t
    arrived at h_t and clip scales it to norm <= clip. The recursion by hand gives the reported norms."""
    model = _model("linear")
    windows = _windows(3, T + 2)
    clip = 0.05
    norms = state_gradient_norms(model, windows, clip=clip)
    a = model.layers[0].weight_hh_l0.detach()
    with torch.no_grad():
        h_last = model(windows[:, :-1]).states[0][0][0]  # (N, H): h_T
    leaf = h_last.clone().requires_grad_(True)
    loss = F.cross_entropy(model.decoder(leaf), windows[:, -1], reduction="sum")
    (g,) = torch.autograd.grad(loss, [leaf])
    for k in range(T + 1):
        torch.testing.assert_close(norms[0, k], g.norm(dim=1), rtol=1e-9, atol=0)
        g = (g * (clip / g.norm(dim=1, keepdim=True)).clamp(max=1.0)) @ a
    unclipped = state_gradient_norms(model, windows)
    assert bool((norms[0, 2:] < unclipped[0, 2:] * 0.999).all())


def test_reinit_recurrent() -> None:
    model = _model("lstm")
    reinit_recurrent(model, "identity")
    w = model.layers[0].weight_hh_l0
    for k in range(4):
        assert torch.equal(w[k * 7 : (k + 1) * 7], torch.eye(7, dtype=w.dtype))
    reinit_recurrent(model, "orthogonal")
    block = w[:7].detach()
    torch.testing.assert_close(block @ block.t(), torch.eye(7, dtype=w.dtype))


def test_gradients_command_writes_csv_and_png(corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "g"
    result = runner.invoke(app, ["gradients", "--cells", "rnn,lstm", "--config", "smoke", "--data", str(corpus_file),
                                 "--max-lag", "25", "--sequences", "3", "--warmup", "4", "--init", "xavier",
                                 "--clip", "0,1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "gradients.csv").open()))
    keys = {(r["cell"], r["init"], r["clip"], r["layer"]) for r in rows}
    assert keys == {(c, i, k, layer) for c in ("rnn", "lstm") for i in ("xavier",) for k in ("0", "1")
                    for layer in ("1", "2")}
    for key in keys:
        ks = [int(r["k"]) for r in rows if (r["cell"], r["init"], r["clip"], r["layer"]) == key]
        assert ks == list(range(26))
    for r in rows:
        for col in ("mean_norm", "std_norm", "q10_norm", "median_norm", "q90_norm"):
            assert math.isfinite(float(r[col])) and float(r[col]) >= 0
    assert (out / "gradients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradients_command_refuses_bad_options(corpus_file: Path, tmp_path: Path) -> None:
    base = ["gradients", "--config", "smoke", "--data", str(corpus_file), "--out", str(tmp_path / "g")]
    cases = [(["--init", "he"], "unknown --init 'he'; valid: default, orthogonal, identity, xavier"),
             (["--clip", "x"], "--clip takes numbers separated by commas"),
             (["--clip", "-1"], "--clip values must be finite numbers >= 0"),
             (["--sequences", "0"], "--sequences must be at least 1"),
             (["--cells", "lstmx"], "lstmx"),
             (["--max-lag", "40000"], "--max-lag must be at most 5,000")]
    for extra, message in cases:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "g").exists()


def test_mingru_state_gradients_are_the_products_of_its_forget_gates() -> None:
    """minGRU's gates read only x, so d h_t / d h_(t-1) = diag(1 - z_t): the gradient reaching h_(T-k) is the one
    at h_T times the product of the last k steps' 1 - z, whatever the scan; --init other than default is refused
    (there is no recurrent matrix to re-initialise)."""
    model = _model("mingru")
    windows = _windows(2, T + 2)
    norms = state_gradient_norms(model, windows)
    layer = model.layers[0]
    x = model.encoder(windows[:, :-1])
    with torch.no_grad():
        steps = list(layer.steps(x))
        leaf = steps[-1][0][0].clone().requires_grad_(True)
    loss = F.cross_entropy(model.decoder(leaf), windows[:, -1], reduction="sum")
    (g,) = torch.autograd.grad(loss, [leaf])
    for k in range(T + 1):
        torch.testing.assert_close(norms[0, k], g.norm(dim=1), rtol=1e-9, atol=0)
        g = g * (1 - steps[T - k][1]["z"])
    with pytest.raises(CharlmError) as caught:
        reinit_recurrent(model, "orthogonal")
    assert str(caught.value) == ("--init orthogonal re-initialises the hidden-to-hidden matrix, which mingru does not "
                                 "have (its gates read only the input); measure it with --init default")
    reinit_recurrent(model, "default")
