"""The fused route of generation's step (charlm.model.fused_step): for every cell family it takes, its logits and
states against PyTorch's step at 1 to 16 rows, its draws against charlm.generation.options.pick's, runs cut short,
and which models take it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import require_cpp_build, shakespeare_text

from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.generation.continuation import Continuation, generate, read_prime
from charlm.generation.options import pick
from charlm.generation.session import Session, Settings
from charlm.model import fast_step, fused_step
from charlm.model.char_lm import CharLM, States
from charlm.native.build import cpp_off
from charlm.util.errors import CharlmError

V = 23


@pytest.fixture(scope="module")
def built() -> None:
    require_cpp_build(fast_step.available, "the model step's C++ library")


def lstm_model(hidden: int = 20, layers: int = 2, embedding: int = 12, seed: int = 0, **settings: object) -> CharLM:
    """A plain LSTM stack with its weights moved off their init (odd sizes: no block of the packed matrices
    is full)."""
    torch.manual_seed(seed)
    config = ModelConfig(cell="lstm", embedding_size=embedding, hidden_size=hidden, num_layers=layers,
                         **settings)  # type: ignore[arg-type]
    model = CharLM(V, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def python_steps(model: CharLM, ids: list[torch.Tensor], states: States | None) -> list[tuple[torch.Tensor, States]]:
    out = []
    with cpp_off():
        for x in ids:
            logits, states = fast_step.step(model, x, states)
            out.append((logits, states))
    return out


SHAPES = [dict(hidden=20, layers=2, embedding=12, tie_weights=False), dict(hidden=20, layers=2, embedding=20),
          dict(hidden=130, layers=1, embedding=7, tie_weights=False), dict(hidden=33, layers=3, embedding=33)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(v) for v in s.values()))
@pytest.mark.parametrize("streams", [1, 3])
def test_the_fused_step_equals_pytorchs_to_1e5(built: None, shape: dict[str, int], streams: int) -> None:
    """Logits to 1e-5 and every state to 1e-5 (absolute or relative), over 30 steps with the state carried,
    from a state a forward pass left."""
    model = lstm_model(**shape)  # type: ignore[arg-type]
    assert fused_step.packed(model, fast_step.available) is not None
    gen = torch.Generator().manual_seed(4)
    prime = torch.randint(0, V, (streams, 5), generator=gen)
    start = model(prime).states
    ids = [torch.randint(0, V, (streams,), generator=gen) for _ in range(30)]
    fused, states = [], start
    for x in ids:
        logits, states = fast_step.step(model, x, states)
        fused.append((logits, states))
    for (logits, states), (ref_logits, ref_states) in zip(fused, python_steps(model, ids, start), strict=True):
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        for state, ref in zip(states, ref_states, strict=True):
            assert [t.shape for t in state] == [t.shape for t in ref]
            for a, b in zip(state, ref, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # c grows past 1: relative too


# every family the route takes: (cell, config overrides), odd sizes (no block of a packed matrix is full)
FAMILIES = [("peephole", {}), ("lstm-f", {}), ("lstm-i", {}), ("lstm-o", {}), ("lstm-b", {}), ("np", {}),
            ("nig", {}), ("nfg", {}), ("nog", {}), ("niaf", {}), ("noaf", {}), ("cifg", {}),
            ("lstm", {"torch_rnn": False}), ("gru", {}), ("gru", {"tie_weights": False, "embedding_size": 9}),
            ("lstm-ln", {}), ("mogrifier", {}), ("mogrifier", {"mogrifier_rounds": 4, "mogrifier_rank": 3}),
            ("mogrifier", {"mogrifier_rounds": 0}), ("lstm", {"layer_norm": True}),
            ("gru", {"layer_norm": True}), ("lstm-ln", {"layer_norm": True}), ("nig", {"num_layers": 3})]


def family_model(cell: str, seed: int = 0, **overrides: object) -> CharLM:
    """A 2-layer model of ``cell`` (hidden 21, embedding 13) with every weight moved off its init (peepholes,
    gains and the Mogrifier's matrices too)."""
    torch.manual_seed(seed)
    settings: dict[str, object] = {"embedding_size": 13, "hidden_size": 21, "num_layers": 2, **overrides}
    model = CharLM(V, ModelConfig(cell=cell, **settings)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("cell", "overrides"), FAMILIES, ids=[f"{c}-{'-'.join(o) or 'default'}" for c, o in FAMILIES])
def test_every_family_equals_pytorchs_step(built: None, cell: str, overrides: dict[str, object]) -> None:
    """Logits and states to 1e-5 over 12 steps with the state carried, at 1, 3 and 16 rows (tiles of 6, 4, 2
    and 1 rows), from a state a forward pass left."""
    model = family_model(cell, **overrides)
    assert fused_step.takes_route(model)
    gen = torch.Generator().manual_seed(6)
    for streams in (1, 3, 16):
        start = model(torch.randint(0, V, (streams, 4), generator=gen)).states
        ids = [torch.randint(0, V, (streams,), generator=gen) for _ in range(12)]
        states = start
        for x, (ref_logits, ref_states) in zip(ids, python_steps(model, ids, start), strict=True):
            logits, states = fast_step.step(model, x, states)
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
            for state, ref in zip(states, ref_states, strict=True):
                assert [t.shape for t in state] == [t.shape for t in ref]
                for a, b in zip(state, ref, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_family_seeded_text_is_the_one_at_a_time_text(built: None) -> None:
    """GRU, peephole, lstm-ln and Mogrifier models draw through the fused runs the same 300 characters as pick
    and PyTorch's step one at a time."""
    for cell in ("gru", "peephole", "lstm-ln", "mogrifier"):
        model = family_model(cell)
        prime = torch.tensor([1, 2, 3])
        fused, _, _ = run_of(model, prime, 300, seed=2)
        with cpp_off():
            plain, _, _ = run_of(model, prime, 300, seed=2)
        assert fused == plain, cell


def test_the_zero_state_and_int32_ids(built: None) -> None:
    model = lstm_model()
    x = torch.tensor([3, 7], dtype=torch.int32)
    logits, states = fast_step.step(model, x)
    ref_logits, ref_states = python_steps(model, [x.long()], None)[0]
    torch.testing.assert_close(states[1][1], ref_states[1][1], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert [len(s) for s in states] == [2, 2] and states[0][0].shape == (1, 2, 20)


def test_the_draw_is_picks_draw(built: None) -> None:
    """Same scores, same generator: the C++ draw takes the same characters as pick and leaves the generator
    where pick leaves it (one float64 uniform per row, as torch.rand draws them)."""
    model = lstm_model()
    pack = fused_step.packed(model, fast_step.available)
    assert pack is not None
    scores = torch.randn(3, V, generator=torch.Generator().manual_seed(5)) * 3
    for temperature in (0.5, 1.0, 1.7):
        ours, theirs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        ids, drawn_from, _ = fused_step.sample(scores, temperature, ours, None, pack, 1)
        assert torch.equal(drawn_from[0], scores)
        assert torch.equal(ids[0], pick(scores, temperature, None, theirs))
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_draws_follow_the_probabilities(built: None) -> None:
    """20,000 draws from fixed scores: each character's share within 0.015 of its probability, and a
    character of probability 0 (score -inf) never drawn, also at u = 0, the one draw that tells a weight of 0
    from exp's float floor (1.2e-38)."""
    model = lstm_model()
    pack = fused_step.packed(model, fast_step.available)
    assert pack is not None
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [float("-inf")] + [-2.0] * (V - 5)]).repeat(4, 1)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for _ in range(5000):
        ids = fused_step.sample(scores, 1.0, gen, None, pack, 1)[0]
        counts += torch.bincount(ids.flatten(), minlength=V)
    share = counts / counts.sum()
    torch.testing.assert_close(share, torch.softmax(scores[0], -1), rtol=0, atol=0.015)
    assert counts[4] == 0
    first_ruled_out = torch.cat([scores[:1, 4:5], scores[:1, :4], scores[:1, 5:]], dim=1)  # -inf at index 0
    assert fused_step.sample(first_ruled_out, 1.0, generator_drawing_zero(), None, pack, 1)[0].tolist() == [[1]]


def generator_drawing_zero() -> torch.Generator:
    """A generator whose next float64 uniform is exactly 0: torch's CPU generator (mt19937) makes it from
    its next two 32-bit outputs, here two state words set to 0 (tempering maps 0 to 0). Its state bytes:
    seed (8), left (int32), seeded (int32), next (8), then the 624 words, 8 bytes each."""
    gen = torch.Generator().manual_seed(0)
    torch.rand(1, dtype=torch.float64, generator=gen)  # past the first twist: the words are read in order
    state = gen.get_state().clone()
    following = int(state[16:24].view(torch.int64))
    words = state[24 : 24 + 624 * 8].view(torch.int64)
    words[following : following + 2] = 0
    gen.set_state(state)
    copy = torch.Generator()
    copy.set_state(gen.get_state())
    assert torch.rand(1, dtype=torch.float64, generator=copy).item() == 0.0
    return gen


def test_a_character_of_probability_zero_is_not_drawn_even_at_u_zero(built: None) -> None:
    """The draw takes the first character whose running sum exceeds u times the total: at u = 0 that is the
    first character of any weight at all, so a -inf score must weigh exactly 0 (exp's float floor, 1.2e-38,
    is not 0). The C++ draw and pick agree on the first finite character."""
    model = lstm_model()
    pack = fused_step.packed(model, fast_step.available)
    assert pack is not None
    scores = torch.tensor([[float("-inf"), float("-inf"), 1.0] + [0.5] * (V - 3)])
    for temperature in (1.0, 0.3):
        ids = fused_step.sample(scores, temperature, generator_drawing_zero(), None, pack, 1)[0]
        assert ids.tolist() == [[2]]
        assert pick(scores, temperature, None, generator_drawing_zero()).tolist() == [2]


def run_of(model: CharLM, vocab_prime: torch.Tensor, length: int, seed: int, taken: int | None = None,
           **options: object) -> tuple[list[int], Continuation, torch.Generator]:
    logits, states = read_prime(model, vocab_prime)
    gen = torch.Generator().manual_seed(seed)
    run = Continuation(model, logits, states, length, temperature=0.9, top_k=None, top_p=None, generator=gen,
                       **options)  # type: ignore[arg-type]
    ids = []
    for nxt, _ in run:
        ids.append(int(nxt[0]))
        if taken is not None and len(ids) == taken:
            break
    return ids, run, gen


def test_a_seeded_text_is_the_one_at_a_time_text(built: None) -> None:
    """Runs of the fused route against pick + PyTorch's step one character at a time: the same 600
    characters (the logits differ by rounding only, far from any draw's boundary here)."""
    model = lstm_model(hidden=32, embedding=32)
    prime = torch.tensor([1, 2, 3])
    fused, _, _ = run_of(model, prime, 600, seed=2)
    with cpp_off():
        plain, _, _ = run_of(model, prime, 600, seed=2)
    assert fused == plain


@pytest.mark.parametrize("taken", [1, 5, 8, 13, 24])
def test_a_run_cut_short_leaves_state_and_generator_as_one_at_a_time(built: None, taken: int) -> None:
    """Stopping after ``taken`` characters (inside or at the end of a run of 8, 16, ...): finish() gives the
    state after exactly those characters and the generator after exactly their draws."""
    model = lstm_model()
    prime = torch.tensor([4, 5])
    ids, run, gen = run_of(model, prime, 100, seed=3, taken=taken)
    logits, states = run.finish()
    exact_ids, exact_run, exact_gen = run_of(model, prime, taken, seed=3)
    exact_logits, exact_states = exact_run.finish()
    assert ids == exact_ids
    assert torch.equal(gen.get_state(), exact_gen.get_state())
    assert torch.equal(logits, exact_logits)
    assert all(torch.equal(a, b) for s, r in zip(states, exact_states, strict=True) for a, b in zip(s, r, strict=True))


def test_a_session_goes_on_from_a_stop_as_one_continuation(built: None) -> None:
    """A continuation ended by a stop string inside a run, then another: together the text of one long
    continuation from the same seed (state and generator carried exactly)."""
    text = shakespeare_text(2000)
    vocab = Vocab.from_text(text)
    torch.manual_seed(1)
    model = CharLM(len(vocab), ModelConfig(cell="lstm", embedding_size=24, hidden_size=24)).eval()
    chunks: list[str] = []
    session = Session(model, vocab, Settings(temperature=1.0, length=300, stop=("e",)), seed=7)
    session.read("ROMEO:")
    for _ in range(2):
        session.continue_text(chunks.append)
    whole: list[str] = []
    one = Session(model, vocab, Settings(temperature=1.0, length=len(chunks)), seed=7)
    one.read("ROMEO:")
    one.continue_text(whole.append)
    assert "".join(chunks).count("e") == 2 and "".join(whole) == "".join(chunks)


def test_not_finite_scores_are_one_sentence(built: None) -> None:
    model = lstm_model()
    logits, states = fast_step.step(model, torch.tensor([1]))
    bad = logits.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(CharlmError, match="not finite numbers"):
        list(Continuation(model, bad, states, 5, temperature=1.0, top_k=None, top_p=None,
                          generator=torch.Generator()))


def ops_run(fn: Callable[[], object]) -> set[str]:
    """The charlm C++ ops that ``fn`` called (torch's profiler names each op it dispatches)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("charlm::")}


@pytest.mark.parametrize(("settings", "aten"), [(dict(cell="rnn"), True), (dict(cell="irnn"), True),
                                               (dict(cell="gru-cho"), False), (dict(cell="lstm-bn"), False),
                                               (dict(cell="fgr"), False), (dict(cell="mut1"), False)], ids=str)
def test_other_models_take_the_aten_op_or_python(built: None, settings: dict[str, object], aten: bool) -> None:
    """The cells the fused route does not take: those the ATen op knows step through it (seen by the
    profiler) and give the Python step's logits and states bit for bit; the rest step in Python."""
    config = ModelConfig(embedding_size=8, hidden_size=8, **settings)  # type: ignore[arg-type]
    model = CharLM(V, config).eval()
    assert not fused_step.takes_route(model) and fused_step.packed(model, fast_step.available) is None
    assert fast_step.sample(model, torch.zeros(1, V), 1.0, None, None, torch.Generator(), None, 4) is None
    assert (fast_step.cpp_step(model, torch.tensor([1, 2]), None) is not None) == aten
    x = torch.tensor([3, 5])
    start = model(torch.tensor([[1, 2], [4, 0]])).states
    out: list[tuple[torch.Tensor, States]] = []
    assert ops_run(lambda: out.append(fast_step.step(model, x, start))) == ({"charlm::model_step"} if aten else set())
    with cpp_off():
        assert ops_run(lambda: out.append(fast_step.step(model, x, start))) == set()
    (logits, states), (ref_logits, ref_states) = out
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(a, b) for s, r in zip(states, ref_states, strict=True) for a, b in zip(s, r, strict=True))


def test_plain_lstm_stacks_take_the_fused_op(built: None) -> None:
    model = lstm_model()
    fast_step.step(model, torch.tensor([1]))  # packs the weights
    assert ops_run(lambda: fast_step.step(model, torch.tensor([1]))) == {"charlm::fused_step"}
    logits = torch.zeros(1, V)
    assert ops_run(lambda: fast_step.sample(model, logits, 1.0, None, None, torch.Generator(), None, 3)) == {
        "charlm::fused_sample"}


def test_more_rows_filters_and_greedy_take_the_other_routes(built: None) -> None:
    model = lstm_model()
    logits = torch.zeros(fused_step.MAX_ROWS + 1, V)
    gen = torch.Generator()
    assert fast_step.sample(model, logits, 1.0, None, None, gen, None, 2) is None
    assert fast_step.sample(model, logits[:1], 1.0, 5, None, gen, None, 2) is None
    assert fast_step.sample(model, logits[:1], 1.0, None, 0.9, gen, None, 2) is None
    assert fast_step.sample(model, logits[:1], 0.0, None, None, gen, None, 2) is None
    assert fast_step.sample(model, logits[:1], 1.0, V, 1.0, gen, None, 2) is not None  # filters that keep all


def test_changed_weights_are_packed_again(built: None) -> None:
    """In-place changes (an optimizer step, load_state_dict), a replaced parameter, and writes that autograd
    does not count (through ``.data``, through a numpy view) are all seen: the fused logits follow."""
    model = lstm_model()
    x = torch.tensor([2])

    def fused_is_python() -> None:
        torch.testing.assert_close(fast_step.step(model, x)[0], python_steps(model, [x], None)[0][0], rtol=0,
                                   atol=1e-5)

    fast_step.step(model, x)
    with torch.no_grad():
        model.layers[0].weight_hh_l0.mul_(0.5)
    fused_is_python()
    model.layers[1].weight_ih_l0 = torch.nn.Parameter(torch.randn_like(model.layers[1].weight_ih_l0))
    fused_is_python()
    model.layers[0].weight_ih_l0.data.mul_(0)
    fused_is_python()
    model.decoder.bias.detach().numpy()[:] = -model.decoder.bias.detach().numpy()
    fused_is_python()
    model.encoder.weight.data[3].mul_(-2.0)  # one row, the character fed: layer 0's input table
    torch.testing.assert_close(fast_step.step(model, torch.tensor([3]))[0],
                               python_steps(model, [torch.tensor([3])], None)[0][0], rtol=0, atol=1e-5)


def test_generate_is_the_same_text_with_the_route_off(built: None) -> None:
    text = shakespeare_text(3000)
    vocab = Vocab.from_text(text)
    torch.manual_seed(3)
    model = CharLM(len(vocab), ModelConfig(cell="lstm", embedding_size=32, hidden_size=32)).eval()
    fast = generate(model, vocab, "ROMEO:", 300, temperature=0.8, seed=11, num_samples=2)
    with fused_step.off():
        plain = generate(model, vocab, "ROMEO:", 300, temperature=0.8, seed=11, num_samples=2)
    assert fast == plain and len(fast[0]) == 306


def test_the_thread_count_does_not_change_a_bit(built: None) -> None:
    """The products' blocks are split between the threads, each sum still in its one order."""
    model = lstm_model(hidden=200, embedding=200)
    x = torch.tensor([5])
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_logits, one_states = fast_step.step(model, x)
        torch.set_num_threads(2)
        two_logits, two_states = fast_step.step(model, x)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one_logits, two_logits)
    pairs = [(a, b) for s, r in zip(one_states, two_states, strict=True) for a, b in zip(s, r, strict=True)]
    assert all(torch.equal(a, b) for a, b in pairs)
