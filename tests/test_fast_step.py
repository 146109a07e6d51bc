"""CharLM.step's C++ op (charlm.model.fast_step) against the Python step it replaces, which models take it, and
its fallback (one library for both C++ routes: this op and the fused LSTM of charlm.model.fused_step)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_cpp_build, shakespeare_text

from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.generation.continuation import generate
from charlm.model import fast_step, fused_step
from charlm.model.char_lm import CharLM, States
from charlm.native.build import cpp_off

V = 23


@pytest.fixture(scope="module")
def built() -> None:
    """The op is built here: see :func:`conftest.require_cpp_build`."""
    require_cpp_build(fast_step.available, "the model step's C++ op")


def small_model(cell: str, seed: int = 0, **overrides: object) -> CharLM:
    """A 2-layer model with tied weights (as the default config), odd sizes, weights moved off their init (a
    fresh peephole LSTM has zero peepholes, which would hide a wrong peephole block)."""
    torch.manual_seed(seed)
    settings: dict[str, object] = {"tie_weights": True, **overrides}
    config = ModelConfig(cell=cell, embedding_size=12, hidden_size=20, num_layers=2, **settings)  # type: ignore[arg-type]
    model = CharLM(V, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def run_steps(model: CharLM, x: torch.Tensor, steps: int) -> list[tuple[torch.Tensor, States]]:
    """``steps`` steps from the zero state, each fed the previous step's argmax: logits and states of each."""
    out, states = [], None
    for _ in range(steps):
        logits, states = fast_step.step(model, x, states)
        out.append((logits, states))
        x = logits.argmax(-1)
    return out


CELLS = [("lstm", {}), ("gru", {}), ("peephole", {}), ("rnn", {}), ("cifg", {}), ("noaf", {}), ("lstm-o", {}),
         ("lstm", {"torch_rnn": False}), ("lstm", {"layer_norm": True}), ("gru", {"tie_weights": False})]


@pytest.mark.parametrize(("cell", "overrides"), CELLS, ids=[f"{c}-{'-'.join(o) or 'default'}" for c, o in CELLS])
@pytest.mark.parametrize("streams", [1, 3])
def test_the_op_equals_the_python_step(built: None, cell: str, overrides: dict[str, object], streams: int) -> None:
    """Bit for bit, logits and every state tensor, over several steps with the state carried (the plain LSTM
    stacks' fused route, which rounds differently, turned off: tests/test_fused_step.py holds it)."""
    model = small_model(cell, **overrides)
    assert fast_step.plan_for(model) is not None
    x = torch.randint(0, V, (streams,), generator=torch.Generator().manual_seed(1))
    with fused_step.off():
        assert fast_step.cpp_step(model, x, None) is not None  # the op runs for this model
        fast = run_steps(model, x, 5)
    with cpp_off():
        assert fast_step.cpp_step(model, x, None) is None
        plain = run_steps(model, x, 5)
    for (logits, states), (logits_ref, states_ref) in zip(fast, plain, strict=True):
        assert torch.equal(logits, logits_ref)
        assert [[t.shape for t in s] for s in states] == [[t.shape for t in s] for s in states_ref]
        for state, ref in zip(states, states_ref, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(state, ref, strict=True))


def test_float64_and_a_state_from_forward(built: None) -> None:
    """Another dtype, and a step that continues the state a sequence forward left (a prime read at once)."""
    model = small_model("peephole").double()
    prime = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(2))
    states = model(prime).states
    x = prime[:, -1]
    fast_logits, fast_states = fast_step.step(model, x, states)
    with cpp_off():
        logits, ref_states = fast_step.step(model, x, states)
    assert fast_logits.dtype == torch.float64 and torch.equal(fast_logits, logits)
    assert all(torch.equal(a, b) for s, r in zip(fast_states, ref_states, strict=True)
               for a, b in zip(s, r, strict=True))


def test_changed_and_replaced_parameters_are_seen(built: None) -> None:
    """The op reads the tensors from the modules at each call: after .double() (the data swapped under the
    same parameters) and after a parameter is replaced by a new one."""
    model = small_model("lstm")
    x = torch.tensor([4, 5])
    fast_step.step(model, x)  # the plan is worked out here, in float32
    model.double()
    model.layers[1].weight_hh_l0 = torch.nn.Parameter(torch.randn_like(model.layers[1].weight_hh_l0))
    fast = run_steps(model, x, 3)
    with cpp_off():
        plain = run_steps(model, x, 3)
    assert fast[-1][0].dtype == torch.float64
    assert all(torch.equal(a[0], b[0]) for a, b in zip(fast, plain, strict=True))


@pytest.mark.parametrize("cell", ["lstm", "gru", "peephole"])
def test_a_seeded_sample_is_the_same_text(built: None, cell: str) -> None:
    text = shakespeare_text(3000)
    vocab = Vocab.from_text(text)
    torch.manual_seed(3)
    model = CharLM(len(vocab), ModelConfig(cell=cell, embedding_size=16, hidden_size=32, num_layers=2)).eval()
    fast = generate(model, vocab, "ROMEO:", 200, temperature=0.9, top_k=20, seed=11, num_samples=2)
    with cpp_off():
        plain = generate(model, vocab, "ROMEO:", 200, temperature=0.9, top_k=20, seed=11, num_samples=2)
    assert fast == plain and len(fast[0]) == 206


@pytest.mark.parametrize("cell", ["gru-cho", "lstm-bn", "fgr", "mut1", "linear"])
def test_other_cells_take_the_python_step(cell: str) -> None:
    """Neither C++ route knows these cells (lstm-ln and the Mogrifier: the fused route's, tests/test_fused_step.py)."""
    model = small_model(cell)
    assert fast_step.plan_for(model) is None and not fused_step.takes_route(model)
    x = torch.tensor([1, 2])
    assert fast_step.cpp_step(model, x, None) is None
    logits, states = fast_step.step(model, x)
    assert logits.shape == (2, V) and len(states) == 2


def test_training_mode_takes_the_python_step(built: None) -> None:
    """In training mode the step draws weight-drop masks: the Python step's business."""
    model = small_model("lstm", weight_drop=0.5).train()
    assert fast_step.cpp_step(model, torch.tensor([1]), None) is None


def test_the_layer_step_count_continues(built: None) -> None:
    """RecurrentLayer.step's time index (lstm-bn's statistics read it) counts the op's steps too."""
    model = small_model("lstm")
    _, states = fast_step.step(model, torch.tensor([1]))
    fast_step.step(model, torch.tensor([2]), states)
    assert [layer._next_t for layer in model.layers] == [2, 2]


def in_fresh_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter (a process decides about the library once)."""
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


FALLBACK = """
import warnings
import torch
from charlm.native.build import cpp_off
from charlm.config import ModelConfig
from charlm.model import fast_step
from charlm.model.char_lm import CharLM
torch.manual_seed(0)
model = CharLM(9, ModelConfig(embedding_size=8, hidden_size=8)).eval()
x = torch.tensor([1, 4])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a, s = fast_step.step(model, x)
    b, _ = fast_step.step(model, x, s)
with cpp_off():
    c, s = fast_step.step(model, x)
    d, _ = fast_step.step(model, x, s)
print(torch.equal(a, c) and torch.equal(b, d), len(caught))
print(caught[0].message if caught else "")
"""


def test_a_failed_build_warns_once_and_the_python_step_runs(tmp_path: Path) -> None:
    run = in_fresh_python(FALLBACK, CHARLM_NATIVE_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    assert run.returncode == 0, run.stderr
    same, message = run.stdout.splitlines()[:2]
    assert same.split() == ["True", "1"]
    assert message.startswith("charlm: could not build the C++ kernel of the model's single step (sampling) (")
    assert "no-such-compiler" in message
    assert message.endswith("or set CHARLM_NATIVE=0 to skip the build.")


def test_charlm_native_0_turns_it_off_without_a_word(tmp_path: Path) -> None:
    run = in_fresh_python(FALLBACK, CHARLM_NATIVE_DIR=str(tmp_path), CHARLM_NATIVE="0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "0"]
    assert not list(tmp_path.iterdir())  # nothing was built
