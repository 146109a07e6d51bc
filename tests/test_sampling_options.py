"""`charlm sample`'s options and their library functions: top-p, stop strings, --prime-file, beam search, --json,
the prime read in one forward pass, and each option's limits (checked before the checkpoint is loaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import invoke_as_printed as invoke

from charlm.data.vocab import Vocab
from charlm.evaluation.scoring import evaluate_ids
from charlm.generation.beam import beam_search
from charlm.generation.continuation import StopMatcher, generate, generate_samples, read_prime, seeded_generator
from charlm.generation.options import decode_escapes, pick
from charlm.model import fast_step
from charlm.model.char_lm import CharLM
from charlm.model.checkpoint import load_model
from charlm.util.errors import CharlmError


@pytest.fixture(scope="module", autouse=True)
def step_library_built() -> None:
    """The model step's C++ library built (or found not buildable) before any output is compared: the build
    says so in a line on stderr, which the CLI runner mixes into the output."""
    fast_step.available()



def one_line(text: str) -> str:
    return " ".join(text.split())  # Rich wraps long error lines


def sample_cli(ckpt: Path, *args: str) -> str:
    code, output = invoke("sample", "--checkpoint", str(ckpt), *args)
    assert code == 0, output
    return output


def strict_json(text: str) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def continuation_nll(model: CharLM, vocab: Vocab, prime: str, text: str) -> float:
    """Summed NLL (nats) of ``text`` given ``prime``, by charlm's evaluation code: the whole text's sum minus the
    prime's (the prime's own characters are scored the same way in both)."""
    def summed(s: str) -> float:
        r = evaluate_ids(model, vocab.encode(s), batch_size=1, bptt=10_000)
        return r["loss"] * r["chars"] if len(s) > 1 else 0.0

    return summed(prime + text) - summed(prime)


@pytest.fixture(scope="module")
def sharp(sharp_checkpoint: Path) -> tuple[CharLM, Vocab]:
    model, vocab, _, _ = load_model(sharp_checkpoint)
    return model, vocab


# ---------------------------------------------------------------------------------------------- top-p
def test_top_p_one_is_plain_sampling(sharp_checkpoint: Path) -> None:
    base = ("--prime", "ROMEO:", "--length", "80", "--seed", "5", "--temperature", "1.3", "--top-k", "30")
    plain = sample_cli(sharp_checkpoint, *base)
    assert sample_cli(sharp_checkpoint, *base, "--top-p", "1.0") == plain
    assert sample_cli(sharp_checkpoint, *base, "--top-p", "0.5") != plain  # the filter does act below 1


def test_top_p_keeps_the_nucleus_after_temperature_and_top_k() -> None:
    probs = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05])
    logits = probs.log().expand(20_000, -1)
    gen = torch.Generator().manual_seed(0)

    def frequencies(temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
        ids = pick(logits, temperature, top_k, gen, top_p=top_p)
        return torch.bincount(ids, minlength=5).double() / ids.numel()

    def expected(kept: list[int], temperature: float = 1.0) -> torch.Tensor:
        p = probs.double() ** (1 / temperature)
        out = torch.zeros(5, dtype=torch.float64)
        out[kept] = p[kept] / p[kept].sum()
        return out

    assert torch.allclose(frequencies(1.0, None, 0.6), expected([0, 1]), atol=0.015)  # 0.45 < 0.6 <= 0.7
    assert torch.allclose(frequencies(1.0, None, 0.75), expected([0, 1, 2]), atol=0.015)
    assert torch.allclose(frequencies(1.0, None, 0.3), expected([0]), atol=0)  # the likeliest is always kept
    assert torch.allclose(frequencies(1.0, 2, 0.9), expected([0, 1]), atol=0.015)  # top-k first, then top-p
    # top-p over the top k renormalised: 0.45 / 0.70 = 0.64 >= 0.6, so only the first survives
    assert torch.allclose(frequencies(1.0, 2, 0.6), expected([0]), atol=0)
    # temperature first: at T = 3 the mass spreads, so 0.6 needs three characters (0.28 + 0.23 + 0.19)
    hot = expected([0, 1, 2, 3, 4], 3.0)
    assert hot[:2].sum() < 0.6 < hot[:3].sum()
    assert torch.allclose(frequencies(3.0, None, 0.6), expected([0, 1, 2], 3.0), atol=0.015)


# --------------------------------------------------------------------------------------------- escapes
def test_decode_escapes_keeps_non_ascii() -> None:
    assert decode_escapes(r"\n\n") == "\n\n"
    assert decode_escapes(r"é\tü") == "é\tü"  # codecs' unicode_escape would give 'Ã©\tÃ¼'
    assert decode_escapes(r"\u00e9 \x41 \U0001F600 \\n \"") == "é A \U0001F600 \\n \""
    with pytest.raises(CharlmError) as bad:
        decode_escapes(r"a\q", what="--stop")
    assert str(bad.value) == ("--stop 'a\\q' has an unknown escape (\\q); known: \\n \\t \\r \\0 \\\\ \\' \\\" \\a \\b "
                              "\\f \\v \\xHH \\uHHHH \\UHHHHHHHH (write a backslash as \\\\)")
    with pytest.raises(CharlmError, match=r"a lone \\ at the end"):
        decode_escapes("end\\", what="--stop")


# ----------------------------------------------------------------------------------------------- stop
def test_stop_matcher_finds_a_stop_across_pieces() -> None:
    matcher = StopMatcher(["\n\n", "END"])
    fed = "ab\nEN\nxE" + "ND!"
    hits = [i for i, ch in enumerate(fed) if matcher.feed(ch)]
    assert hits[0] == fed.index("END") + 2


def test_stop_ends_the_stream_right_after_the_first_stop(sharp_checkpoint: Path) -> None:
    base = ("--prime", "ROMEO:", "--length", "300", "--seed", "2", "--temperature", "0.9")
    full = sample_cli(sharp_checkpoint, *base).removeprefix("ROMEO:").removesuffix("\n")
    first = next(i for i in range(20, 200) if "\n" in full[i:i + 2])  # a stop with a newline, not at the start
    stop, other = full[first:first + 2], full[first + 40:first + 43]
    end = full.index(stop) + len(stop)
    assert full.find(other) == -1 or full.find(other) + len(other) > end
    escaped = stop.replace("\n", "\\n")
    got = sample_cli(sharp_checkpoint, *base, "--stop", other, "--stop", escaped)
    assert got == "ROMEO:" + full[:end] + "\n"  # the stop string included, then the line end
    pieces: list[str] = []
    model, vocab, _, _ = load_model(sharp_checkpoint)
    from charlm.generation.continuation import stream

    assert stream(model, vocab, "ROMEO:", 300, pieces.append, temperature=0.9, seed=2, stop=[stop])
    assert "".join(pieces) == full[:end] and len(pieces) == end  # one write per character: the stop straddled


def test_stop_with_several_samples_cuts_each(sharp: tuple[CharLM, Vocab]) -> None:
    model, vocab = sharp
    full = generate_samples(model, vocab, "KING:", 200, temperature=1.0, seed=4, num_samples=3)
    stops = ["e ", "é"]
    cut = generate_samples(model, vocab, "KING:", 200, temperature=1.0, seed=4, num_samples=3, stop=stops)
    for whole, part in zip(full, cut, strict=True):
        ends = [whole.text.index(s) + len(s) for s in stops if s in whole.text]
        assert part.text == whole.text[:min(ends, default=200)]
        assert part.stopped == bool(ends)
    assert any(p.stopped for p in cut) and any(len(p.text) < 200 for p in cut)


# ---------------------------------------------------------------------------------------------- prime
def test_prime_file_equals_prime(sharp_checkpoint: Path, tmp_path: Path) -> None:
    text = "ROMEO: é\nthe rest\n"
    path = tmp_path / "prime.txt"
    path.write_text(text, encoding="utf-8")
    args = ("--length", "60", "--seed", "9")
    assert sample_cli(sharp_checkpoint, "--prime-file", str(path), *args) == \
        sample_cli(sharp_checkpoint, "--prime", text, *args)


def test_prime_file_problems_in_one_sentence(sharp_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = str(sharp_checkpoint)
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("ROMEO~ ü", encoding="utf-8")
    code, by_file = invoke("sample", "--checkpoint", ckpt, "--prime-file", str(unknown))
    code2, by_option = invoke("sample", "--checkpoint", ckpt, "--prime", "ROMEO~ ü")
    assert code == code2 == 2
    assert one_line(by_file) == one_line(by_option).replace("--prime", f"--prime-file {unknown}")
    assert "'~' (1x), 'ü' (1x)" in one_line(by_file)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ROMEO: é".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for path, message in ((tmp_path / "none.txt", f"--prime-file {tmp_path / 'none.txt'} does not exist; give the "
                           "path of a UTF-8 text file"),
                          (tmp_path, f"--prime-file {tmp_path} is a folder; give the path of a UTF-8 text file"),
                          (latin1, f"--prime-file {latin1} is not UTF-8 text (invalid byte 0xe9 at offset 7); save it "
                           "as UTF-8"),
                          (empty, f"--prime-file {empty} is empty; the prime needs at least one character")):
        code, output = invoke("sample", "--checkpoint", ckpt, "--prime-file", str(path))
        assert (code, one_line(output)) == (2, f"error: {message}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "peephole"])
def test_prime_is_read_in_one_forward_pass(cell: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same logits and states as reading it a character at a time, the same greedy text (to float
    rounding), and no step for the prime: generating N characters steps the model N - 1 times."""
    from conftest import shakespeare_text, write_model_checkpoint

    ckpt = write_model_checkpoint(tmp_path / f"{cell}.ckpt", shakespeare_text(), scale=4.0, cell=cell,
                                  hidden_size=24, embedding_size=16)
    model, vocab, _, _ = load_model(ckpt)
    prime = "ROMEO:\nWhat light through yonder window"
    ids = vocab.encode(prime)
    logits, states = read_prime(model, ids, streams=3)
    old_states = None
    for i in ids.tolist():  # the old way: one step per prime character
        old_logits, old_states = fast_step.step(model, torch.full((3,), i), old_states)
    # this model is chaotic (scale 4): the sequence kernel's and the step's rounding differ by a few ulp at
    # each of the prime's 40 characters and grow along it, by an amount that depends on the CPU's kernels
    assert torch.allclose(logits, old_logits, rtol=1e-4, atol=1e-4)
    for new, old in zip(states, old_states, strict=True):
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(new, old, strict=True))
    old_text, x, s = [], old_logits[:1].argmax(-1), [tuple(t[:, :1] for t in st) for st in old_states]
    for _ in range(60):  # this model is chaotic: float rounding differences grow, after ~100 chars for gru
        old_text.append(vocab.chars[int(x)])
        step_logits, s = fast_step.step(model, x, s)
        x = step_logits.argmax(-1)
    steps = []
    real_step = fast_step.step
    monkeypatch.setattr(fast_step, "step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    assert generate(model, vocab, prime, 60, temperature=0.0) == [prime + "".join(old_text)]
    assert len(steps) == 59


# ----------------------------------------------------------------------------------------------- beam
def test_beam_one_is_greedy(sharp_checkpoint: Path) -> None:
    base = ("--prime", "JULIET:", "--length", "200")
    assert sample_cli(sharp_checkpoint, *base, "--beam", "1") == sample_cli(sharp_checkpoint, *base,
                                                                            "--temperature", "0")


def test_beam_finds_the_likeliest_continuations(sharp: tuple[CharLM, Vocab]) -> None:
    """With as many beams as characters, two characters' search is exhaustive: it must return the best pairs of
    all V x V, as scored by charlm's evaluation code."""
    model, vocab = sharp
    v = len(vocab)
    found = beam_search(model, vocab, "ROMEO:", 2, beam=v, num_results=5)
    logits, _ = read_prime(model, vocab.encode("ROMEO:"))
    first = torch.log_softmax(logits.double(), -1)[0]  # (V,)
    seqs = torch.cat([vocab.encode("ROMEO:").expand(v, -1), torch.arange(v)[:, None]], dim=1)
    second = torch.log_softmax(model(seqs).logits[:, -1].double(), -1)  # (V, V)
    scores = (first[:, None] + second).flatten()
    best = scores.sort(descending=True, stable=True).indices[:5]
    assert [r.text for r in found] == [vocab.chars[int(i) // v] + vocab.chars[int(i) % v] for i in best]
    assert [r.logprob for r in found] == pytest.approx(scores[best].tolist(), abs=1e-5)
    again = beam_search(model, vocab, "ROMEO:", 60, beam=6, num_results=3)
    assert again == beam_search(model, vocab, "ROMEO:", 60, beam=6, num_results=3)  # deterministic
    assert [r.logprob for r in again] == sorted((r.logprob for r in again), reverse=True)
    assert len({r.text for r in again}) == 3
    for r in again:
        assert abs(-continuation_nll(model, vocab, "ROMEO:", r.text) - r.logprob) < 1e-3


# ----------------------------------------------------------------------------------------------- json
@pytest.mark.parametrize("extra", [("--temperature", "0.7", "--top-k", "12", "--top-p", "0.9", "--num-samples", "2",
                                    "--stop", "e "),
                                   ("--temperature", "1.5"), ("--beam", "3", "--num-samples", "2")],
                         ids=["filtered-several-stop", "hot", "beam"])
def test_json_logprob_is_the_evaluated_nll(sharp_checkpoint: Path, sharp: tuple[CharLM, Vocab],
                                           extra: tuple[str, ...]) -> None:
    model, vocab = sharp
    seed = () if "--beam" in extra else ("--seed", "11")
    result = strict_json(sample_cli(sharp_checkpoint, "--prime", "ROMEO:", "--length", "120", "--json", *seed,
                                    *extra))
    assert result["prime"] == "ROMEO:" and result["checkpoint"] == str(sharp_checkpoint)
    assert len(result["samples"]) == (int(extra[extra.index("--num-samples") + 1]) if "--num-samples" in extra else 1)
    for s in result["samples"]:
        assert s["chars"] == len(s["text"])
        if "--stop" in extra:
            assert s["stopped"] == s["text"].endswith("e ") and s["text"].count("e ") == int(s["stopped"])
        assert abs(-continuation_nll(model, vocab, "ROMEO:", s["text"]) - s["logprob"]) < 1e-3


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("args", "message"), [
    (("--top-p", "0"), "--top-p must be a number above 0 and at most 1 (1 keeps every character), got 0.0"),
    (("--top-p", "1.5"), "--top-p must be a number above 0 and at most 1 (1 keeps every character), got 1.5"),
    (("--top-p", "nan"), "--top-p must be a number above 0 and at most 1 (1 keeps every character), got nan"),
    (("--beam", "0"), "--beam must be at least 1, got 0"),
    (("--beam", "1001"), "--beam must be at most 1,000, got 1,001"),
    (("--beam", "2", "--num-samples", "3"), "--num-samples must be at most --beam: beam search keeps 2 candidate(s), "
                                            "so it cannot return 3; ask for fewer samples or more beams"),
    (("--beam", "1000", "--length", "200000"), "--beam x --length must be at most 100,000,000 characters (every beam "
                                               "is kept in memory until the search ends), got 1,000 x 200,000"),
    (("--beam", "4", "--temperature", "1", "--stop", "x"), "--beam searches for the likeliest continuation of "
     "--length characters at temperature 1, so --temperature, --stop cannot go with it; drop them"),
    (("--stop", ""), "--stop must not be empty (an empty stop string would end every sample before its first "
                     "character)"),
    (("--stop", "ab\\"), "--stop 'ab\\' has an unknown escape (a lone \\ at the end); known: \\n \\t \\r \\0 \\\\ "
                         "\\' \\\" \\a \\b \\f \\v \\xHH \\uHHHH \\UHHHHHHHH (write a backslash as \\\\)"),
    (("--prime", "a", "--prime-file", "a.txt"), "--prime and --prime-file both give the prime; use one of them"),
    (("--interactive", "--json", "--num-samples", "2"), "--interactive continues one text line by line, so --json, "
                                                        "--num-samples cannot go with it; drop them"),
], ids=["top-p-0", "top-p-1.5", "top-p-nan", "beam-0", "beam-huge", "beam-samples", "beam-x-length", "beam-options",
        "stop-empty", "stop-escape", "two-primes", "interactive-json"])
def test_options_refused_before_loading(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    """A checkpoint that does not exist: the option's own message shows it was checked first."""
    code, output = invoke("sample", "--checkpoint", str(tmp_path / "missing.ckpt"), *args)
    assert (code, one_line(output)) == (2, f"error: {message}")


def test_an_unseeded_generator_leaves_the_global_one_alone() -> None:
    """``seed=None`` draws a fresh seed for its own generator, not by reseeding torch's global one (which
    would change what the caller's seeded code draws next)."""
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    generators = [seeded_generator(None) for _ in range(2)]
    assert torch.equal(torch.rand(4), expected)
    assert generators[0].initial_seed() != generators[1].initial_seed()
    assert seeded_generator(7).initial_seed() == 7
