"""charlm.tools.viz.trace and the cells' step_gates: the recorded h / c are the model's own (its torch RNN kernels
included), the surprisal and top-5 are the model's own prediction, and the gates satisfy their cells'
identities."""

from __future__ import annotations

import pytest
import torch
from conftest import shakespeare_text

from charlm.cells.registry import cell_names, get_cell
from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.model.char_lm import CharLM
from charlm.tools.viz.limits import MAX_CHARS
from charlm.tools.viz.trace import trace
from charlm.util.errors import CharlmError

TEXT = shakespeare_text(120)


def _model(cell: str, layers: int = 2, seed: int = 0) -> tuple[CharLM, Vocab]:
    torch.manual_seed(seed)
    vocab = Vocab.from_text(shakespeare_text(2000))
    config = ModelConfig(cell=cell, embedding_size=12, hidden_size=16, num_layers=layers, dropout=0.0,
                         dropouth=0.0, tie_weights=False)
    model = CharLM(len(vocab), config).double().eval()
    return model, vocab


def _layer_outputs(model: CharLM, ids: torch.Tensor) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """Each layer's forward output (T, H) and final state, through the model's own forward path."""
    out = []
    with torch.no_grad():
        x = model.encoder(ids.unsqueeze(0))
        for layer, norm in zip(model.layers, model.norms, strict=True):
            h, state = layer(x)
            out.append((h[0], state))
            x = norm(h)
    return out


@pytest.mark.parametrize("cell", ["lstm", "gru", "peephole", "cifg", "rnn", "mut2"])
def test_recorded_states_are_the_models_own(cell: str) -> None:
    model, vocab = _model(cell)
    ids = vocab.encode(TEXT)
    if cell in ("lstm", "gru", "rnn"):
        assert model.layers[0].torch_rnn  # the reference is torch's kernel, the record the cell's step
    tr = trace(model, vocab, TEXT)
    for rec, (h, state) in zip(tr.layers, _layer_outputs(model, ids), strict=True):
        torch.testing.assert_close(rec.h.double(), h, atol=1e-5, rtol=0)
        torch.testing.assert_close(rec.h[-1].double(), state[0][0, 0], atol=1e-5, rtol=0)
        if get_cell(cell).num_states >= 2:
            assert rec.c is not None
            torch.testing.assert_close(rec.c[-1].double(), state[1][0, 0], atol=1e-5, rtol=0)
        else:
            assert rec.c is None
    # the surprisal and the top-5 are the model's forward logits
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids.unsqueeze(0)).logits[0], -1)
    want = -log_probs[:-1].gather(1, ids[1:, None]).squeeze(1)
    assert torch.isnan(tr.surprisal[0])
    torch.testing.assert_close(tr.surprisal[1:].double(), want, atol=1e-5, rtol=0)
    assert tr.top_ids.shape == (len(TEXT), 5)
    torch.testing.assert_close(tr.top_ids, log_probs.topk(5, -1).indices)
    torch.testing.assert_close(tr.top_probs.double(), log_probs.topk(5, -1).values.exp(), atol=1e-5, rtol=0)


def test_lstm_gates_satisfy_the_cell_update() -> None:
    """c_t = f c_{t-1} + i g and h_t = o tanh(c_t), with the gates the cell reports (a torch-kernel lstm)."""
    model, vocab = _model("lstm", layers=1)
    rec = trace(model, vocab, TEXT).layers[0]
    assert set(rec.gates) == {"i", "f", "g", "o"}
    c_prev = torch.cat([torch.zeros(1, rec.c.shape[1]), rec.c[:-1]])
    g = rec.gates
    torch.testing.assert_close(rec.c, g["f"] * c_prev + g["i"] * g["g"], atol=1e-6, rtol=0)
    torch.testing.assert_close(rec.h, g["o"] * torch.tanh(rec.c), atol=1e-6, rtol=0)
    for name in ("i", "f", "o"):
        assert bool(((g[name] > 0) & (g[name] < 1)).all())


def test_gru_gates_satisfy_the_cell_update() -> None:
    """h_t = (1 - z) n + z h_{t-1} (nn.GRU's form), with the gates the cell reports."""
    model, vocab = _model("gru", layers=1)
    rec = trace(model, vocab, TEXT).layers[0]
    assert list(rec.gates) == ["r", "z", "n"]
    h_prev = torch.cat([torch.zeros(1, rec.h.shape[1]), rec.h[:-1]])
    z, n = rec.gates["z"], rec.gates["n"]
    torch.testing.assert_close(rec.h, (1 - z) * n + z * h_prev, atol=1e-6, rtol=0)


def test_every_cell_traces_with_its_own_gates() -> None:
    """Each cell offers the quantities it has: no c without a cell state, no removed gate."""
    expected = {"rnn": [], "linear": [], "lstm-f": ["i", "g", "o"], "lstm-o": ["i", "f", "g"],
                "cifg": ["i", "f", "g", "o"], "mut1": ["z", "r", "n"], "fgr": ["i", "f", "g", "o"],
                "mingru": ["z", "g"], "minlstm": ["f", "i", "g"], "slstm": ["i", "f", "g", "o"]}
    for cell in cell_names():
        model, vocab = _model(cell, layers=1)
        rec = trace(model, vocab, TEXT[:20]).layers[0]
        names = list(rec.quantities())
        assert names[0] == "h"
        assert ("c" in names) == (get_cell(cell).num_states >= 2), cell
        if cell in expected:
            assert list(rec.gates) == expected[cell], cell
        for value in rec.quantities().values():
            assert value.shape == (20, 16) and bool(torch.isfinite(value).all()), cell


def test_text_bounds() -> None:
    model, vocab = _model("rnn", layers=1)
    with pytest.raises(CharlmError, match=f"more than the limit of {MAX_CHARS:,}"):
        trace(model, vocab, "a" * (MAX_CHARS + 1))
    with pytest.raises(CharlmError, match="is empty"):
        trace(model, vocab, "")
    with pytest.raises(CharlmError, match="more than the limit of 10"):
        trace(model, vocab, "hello world", max_chars=10)
