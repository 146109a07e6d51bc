"""`charlm eval --dynamic` and `--per-char`: the per-character NLLs add up to `charlm eval`'s loss, no score
depends on its own character or a later one, dynamic evaluation beats static on held-out text, and the
weights come back unchanged."""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import invoke, shakespeare_text
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config import ModelConfig
from charlm.data.datamodule import split_ids
from charlm.data.vocab import Vocab
from charlm.evaluation.dynamic import (
    DynamicSettings,
    dynamic_char_nlls,
    dynamic_update,
    evaluate_dynamic,
    evaluate_static,
    gradient_rms,
    summarize_chars,
    write_char_nlls,
)
from charlm.evaluation.metrics import LN2
from charlm.evaluation.scoring import char_nlls
from charlm.model.char_lm import CharLM
from charlm.model.checkpoint import load_model
from charlm.util.errors import CharlmError

runner = CliRunner()




def eval_json(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def read_nlls(path: Path) -> list[tuple[int, str, float]]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["position", "char", "nll"]
    return [(int(p), c, float(v)) for p, c, v in rows[1:]]


def test_static_per_char_adds_up_to_the_eval_loss(trained_run: Path, tmp_path: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    plain = eval_json("--checkpoint", ckpt, "--split", "val")
    with_file = eval_json("--checkpoint", ckpt, "--split", "val", "--per-char", str(tmp_path / "val.csv"))
    rows = read_nlls(tmp_path / "val.csv")
    assert len(rows) == plain["chars"] and [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert abs(sum(r[2] for r in rows) / len(rows) - plain["loss"]) < 1e-5
    assert abs(with_file["loss"] - plain["loss"]) < 1e-5 and with_file["streams"] == plain["streams"] > 1
    _, vocab, cfg, _ = load_model(trained_run / "best.ckpt")
    val = split_ids(vocab.encode(Path(cfg.data.path).read_text(encoding="utf-8")), cfg.data.val_fraction,
                    cfg.data.test_fraction).val
    escaped = {"\n": "\\n", "\\": "\\\\"}
    assert [r[1] for r in rows] == [escaped.get(c, c) for c in vocab.decode(val)[1:]]


def test_no_score_depends_on_its_own_character_or_later(trained_run: Path, tmp_path: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    text = shakespeare_text(20_600)[20_000:]
    j = 325  # in the middle of a dynamic segment (positions 301-350) and of a static stream (297-370)
    changed = text[:j] + ("e" if text[j] != "e" else "a") + text[j + 1 :]
    for mode in ([], ["--dynamic", "--dynamic-bptt", "50", "--dynamic-lr", "1e-3"]):
        scores = []
        for name, body in (("a", text), ("b", changed)):
            (tmp_path / f"{name}.txt").write_text(body, encoding="utf-8")
            eval_json("--checkpoint", ckpt, "--text", str(tmp_path / f"{name}.txt"), *mode,
                      "--per-char", str(tmp_path / f"{name}.csv"))
            scores.append([r[2] for r in read_nlls(tmp_path / f"{name}.csv")])
        before, after = scores
        assert before[: j - 1] == after[: j - 1], mode  # positions 1 .. j - 1 (entry p - 1): untouched
        assert before[j:] != after[j:], mode  # the change does reach the scores after it


def test_each_score_is_a_distribution_over_the_character_scored(sharp_checkpoint: Path) -> None:
    """Put every character of the vocabulary in turn at position j: if the score of position j does not
    depend on the character there, the scores are -log of one distribution, so exp(-nll) sums to 1."""
    model, vocab, _, _ = load_model(sharp_checkpoint)
    text, j = shakespeare_text(10_070)[10_000:], 45
    train = vocab.encode(shakespeare_text(1_000))
    settings = DynamicSettings(lr=3e-3, decay=0.01, bptt=20, rms_windows=1)
    static, dynamic = [], []
    for c in vocab.chars:
        ids = vocab.encode(text[:j] + c + text[j + 1 :])
        static.append(float(char_nlls(model, ids, batch_size=1, bptt=32)[j - 1]))
        dynamic.append(float(dynamic_char_nlls(model, ids, train, settings, train_batch_size=4, train_bptt=32)[j - 1]))
    assert abs(sum(math.exp(-v) for v in static) - 1) < 1e-5
    assert abs(sum(math.exp(-v) for v in dynamic) - 1) < 1e-5


def test_dynamic_beats_static_on_the_held_out_split(trained_run: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    static = eval_json("--checkpoint", ckpt, "--split", "test")
    one_stream = eval_json("--checkpoint", ckpt, "--split", "test", "--batch-size", "1")
    dynamic = eval_json("--checkpoint", ckpt, "--split", "test", "--dynamic", "--dynamic-lr", "1e-3",
                        "--dynamic-decay", "0")
    assert dynamic["chars"] == static["chars"] and dynamic["streams"] == 1
    assert dynamic["dynamic"]["bptt"] == 32  # the smoke run's data.bptt
    assert dynamic["loss"] < min(static["loss"], one_stream["loss"]) - 0.01


def test_dynamic_evaluation_puts_the_weights_back(sharp_checkpoint: Path) -> None:
    model, vocab, _, _ = load_model(sharp_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = vocab.encode(shakespeare_text(3_000)[2_000:])
    nll = dynamic_char_nlls(model, ids, ids, DynamicSettings(lr=1e-3, decay=0.01, bptt=40, rms_windows=2),
                            train_batch_size=4, train_bptt=40)
    assert nll.shape == (999,) and bool(torch.isfinite(nll).all())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_dynamic_option_errors(trained_run: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    assert invoke("eval", "--checkpoint", ckpt, "--dynamic-lr", "1e-3") == (
        2, "error: --dynamic-lr sets up dynamic evaluation; add --dynamic")
    assert invoke("eval", "--checkpoint", ckpt, "--dynamic", "--batch-size", "4") == (
        2, "error: --dynamic reads the text as one stream, in order, so that every score stays a prediction; "
           "leave out --batch-size (got 4) or give 1")
    assert invoke("eval", "--checkpoint", ckpt, "--dynamic", "--dynamic-lr", "0") == (
        2, "error: --dynamic-lr must be positive, got 0.0")
    assert invoke("eval", "--checkpoint", ckpt, "--dynamic", "--dynamic-decay", "2") == (
        2, "error: --dynamic-decay must be between 0 and 1, got 2.0")
    assert invoke("eval", "--checkpoint", ckpt, "--dynamic", "--dynamic-bptt", "0") == (
        2, "error: --dynamic-bptt must be at least 1, got 0")


# ------------------------------------------------------------------------- the update, by hand (issue #30, 1)
def test_the_update_is_krauses_formula_by_hand() -> None:
    """θ <- θ - lr ∇ / (RMS + eps) + rate (θ_g - θ), both terms from the weights before the step (Krause et
    al. 2018): worked by hand for two weights, one with its decay rate capped at 1, which still adapts."""
    p = torch.tensor([1.0, -2.0], requires_grad=True)
    p.grad = torch.tensor([0.5, 1.0])
    theta_g, rate, scale = torch.tensor([2.0, -2.0]), torch.tensor([0.25, 1.0]), torch.tensor([4.0, 2.0])
    dynamic_update([p], [theta_g], [rate], [scale], lr=0.1)
    # 1 - 0.1 * 0.5 * 4 + 0.25 * (2 - 1) = 1.05;  -2 - 0.1 * 1 * 2 + 1 * (-2 - -2) = -2.2
    assert p.detach().tolist() == pytest.approx([1.05, -2.2], abs=1e-7)
    q = torch.tensor([3.0], requires_grad=True)  # no gradient (a weight the segment did not reach): decay only
    dynamic_update([q], [torch.tensor([1.0])], [torch.tensor([0.5])], [torch.tensor([9.0])], lr=0.1)
    assert q.detach().tolist() == [2.0]


def tiny_model(vocab_size: int) -> CharLM:
    torch.manual_seed(0)
    config = ModelConfig(cell="lstm", embedding_size=4, hidden_size=5, num_layers=1, tie_weights=False,
                         dropout=0.0, dropouth=0.0)
    return CharLM(vocab_size, config).eval()


def reference_dynamic_nlls(model: CharLM, ids: torch.Tensor, train: torch.Tensor, lr: float, decay: float,
                           bptt: int, windows: int, eps: float) -> list[float]:
    """Dynamic evaluation written out plainly on a copy of ``model``: the RMS from ``windows`` windows of
    ``train`` read as one stream, then per segment: score, one step of θ - lr ∇ / (RMS + eps) + rate (θ_g - θ)."""
    net = copy.deepcopy(model)
    params = list(net.parameters())
    theta_g = [p.detach().clone() for p in params]
    squares = [torch.zeros_like(p) for p in params]
    states = None
    for k in range(windows):
        x, y = train[k * bptt : (k + 1) * bptt], train[k * bptt + 1 : (k + 1) * bptt + 1]
        net.zero_grad()
        out = net(x.view(1, -1), states)
        F.cross_entropy(out.logits[0], y).backward()
        states = [tuple(t.detach() for t in s) for s in out.states]
        for total, p in zip(squares, params, strict=True):
            total += p.grad**2
    rms = [(total / windows).sqrt() for total in squares]
    mean_rms = torch.cat([r.flatten() for r in rms]).mean()
    rates = [torch.clamp(decay * r / mean_rms, max=1.0) for r in rms]
    nlls: list[float] = []
    states = None
    for start in range(0, ids.numel() - 1, bptt):
        x, y = ids[start : start + bptt], ids[start + 1 : start + bptt + 1]
        x = x[: y.numel()]
        net.zero_grad()
        out = net(x.view(1, -1), states)
        per_char = F.cross_entropy(out.logits[0], y, reduction="none")
        nlls += per_char.tolist()
        per_char.mean().backward()
        states = [tuple(t.detach() for t in s) for s in out.states]
        with torch.no_grad():
            for p, theta, r, g in zip(params, theta_g, rates, rms, strict=True):
                p.copy_(p - lr * p.grad / (g + eps) + r * (theta - p))
    return nlls


@pytest.mark.parametrize("decay", [0.0, 0.3, 1.0])
def test_dynamic_nlls_are_the_plain_loop_on_a_tiny_model(decay: float) -> None:
    """Every score of dynamic evaluation equals that of the update written out by hand, segment after segment
    (segments of 7 over 60 characters, a short last one); with decay the scores differ from decay 0."""
    text = shakespeare_text(200)
    vocab = Vocab.from_text(text)
    ids, train = vocab.encode(text[:60]), vocab.encode(text[60:200])
    model = tiny_model(len(vocab))
    settings = DynamicSettings(lr=0.01, decay=decay, bptt=7, rms_windows=19)  # every training window
    ours = dynamic_char_nlls(model, ids, train, settings, train_batch_size=1, train_bptt=7)
    assert ours.dtype == torch.float64 and ours.shape == (59,)  # float64, as the docstring promises
    expected = reference_dynamic_nlls(model, ids, train, lr=0.01, decay=decay, bptt=7, windows=19, eps=settings.eps)
    assert ours.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    static = char_nlls(model, ids, batch_size=1, bptt=7)
    assert ours[:6].tolist() == pytest.approx(static[:6].tolist(), abs=1e-6)  # segment 1: the trained weights
    assert (ours[6:] - static[6:]).abs().max() > 1e-3  # later segments: adapted


def test_gradient_rms_is_the_root_mean_square_by_hand() -> None:
    """RMS of each weight's gradient over the first windows of the training text, read as ``batch_size``
    streams with the state carried: against the squares summed by hand; the weights and gradients untouched."""
    text = shakespeare_text(300)
    vocab = Vocab.from_text(text)
    train = vocab.encode(text)
    model = tiny_model(len(vocab))
    before = [p.detach().clone() for p in model.parameters()]
    rms = gradient_rms(model, train, batch_size=2, bptt=9, windows=4)
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind (not even zeros)
    rows = train[: 2 * ((train.numel() - 1) // 2) + 1]
    length = (train.numel() - 1) // 2
    xs, ys = rows[:-1].view(2, length), train[1 : 2 * length + 1].view(2, length)
    squares = [torch.zeros_like(p) for p in model.parameters()]
    states = None
    for k in range(4):
        model.zero_grad()
        out = model(xs[:, k * 9 : (k + 1) * 9], states)
        F.cross_entropy(out.logits.reshape(-1, len(vocab)), ys[:, k * 9 : (k + 1) * 9].reshape(-1)).backward()
        states = [tuple(t.detach() for t in s) for s in out.states]
        for total, p in zip(squares, model.parameters(), strict=True):
            total += p.grad**2
    model.zero_grad(set_to_none=True)
    for r, total in zip(rms, squares, strict=True):
        torch.testing.assert_close(r, (total / 4).sqrt(), rtol=1e-5, atol=1e-8)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(CharlmError) as caught:
        gradient_rms(model, vocab.encode(text[:1]), batch_size=2, bptt=9, windows=4)
    assert str(caught.value) == ("dynamic evaluation needs training text for its gradient statistics, and the "
                                 "training split is too short for one window")


def hand_rms(model: CharLM, xs: torch.Tensor, ys: torch.Tensor) -> list[torch.Tensor]:
    """|gradient| of each weight for one window (the RMS over one window), computed plainly."""
    model.zero_grad()
    out = model(xs)
    F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), ys.reshape(-1)).backward()
    grads = [p.grad.abs().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def test_gradient_rms_on_the_shortest_training_texts() -> None:
    """Two characters make one window (one target); a text shorter than the streams asked for is read as one
    stream per target, as evaluation does, not refused."""
    text = shakespeare_text(300)
    vocab = Vocab.from_text(text)
    model = tiny_model(len(vocab))
    two = vocab.encode(text[:2])
    rms = gradient_rms(model, two, batch_size=4, bptt=9, windows=4)
    for r, g in zip(rms, hand_rms(model, two[:1].view(1, 1), two[1:].view(1, 1)), strict=True):
        torch.testing.assert_close(r, g, rtol=1e-5, atol=1e-8)
    five = vocab.encode(text[:5])  # 4 targets, 8 streams asked for: 4 streams of one character
    rms = gradient_rms(model, five, batch_size=8, bptt=9, windows=4)
    for r, g in zip(rms, hand_rms(model, five[:4].view(4, 1), five[1:].view(4, 1)), strict=True):
        torch.testing.assert_close(r, g, rtol=1e-5, atol=1e-8)


def test_settings_are_checked_with_their_option_names() -> None:
    for lr, decay, bptt, message in [
        (0.0, 0.0, 5, "--dynamic-lr must be positive, got 0.0"),
        (-1e-3, 0.0, 5, "--dynamic-lr must be positive, got -0.001"),
        (math.nan, 0.0, 5, "--dynamic-lr must be positive, got nan"),
        (1e-3, 1.5, 5, "--dynamic-decay must be between 0 and 1, got 1.5"),
        (1e-3, -0.1, 5, "--dynamic-decay must be between 0 and 1, got -0.1"),
        (1e-3, 0.0, 0, "--dynamic-bptt must be at least 1, got 0"),
    ]:
        with pytest.raises(CharlmError) as caught:
            DynamicSettings(lr=lr, decay=decay, bptt=bptt).check()
        assert str(caught.value) == message
    for decay in (0.0, 1.0):  # both ends of the decay's range are allowed
        DynamicSettings(lr=1e-9, decay=decay, bptt=1).check()


def test_settings_as_reported() -> None:
    """What `charlm eval --dynamic --json` reports under "dynamic": every setting, the defaults included."""
    assert DynamicSettings(lr=1e-3, decay=0.5, bptt=9).to_dict() == {
        "lr": 1e-3, "decay": 0.5, "bptt": 9, "rms_windows": 20, "eps": 1e-5}


def test_summarize_chars_by_hand() -> None:
    nll = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert summarize_chars(nll, 2.0) == {"loss": 2.0, "bpc": 2.0 / LN2, "perplexity": math.exp(2.0), "chars": 3,
                                         "seconds": 2.0, "chars_per_s": 1.5}
    assert summarize_chars(nll, 0.5)["chars_per_s"] == 6.0
    assert summarize_chars(nll, 0.0)["chars_per_s"] == 3 / 1e-9  # no time measured: not a division by zero


def test_evaluate_static_and_dynamic_summarise_their_nlls() -> None:
    """Their figures are those of the per-character NLLs they return, scored with the streams asked for, timed
    by the call itself."""
    text = shakespeare_text(200)
    vocab = Vocab.from_text(text)
    ids, train = vocab.encode(text[:60]), vocab.encode(text[60:200])
    model = tiny_model(len(vocab))
    with torch.no_grad():
        one_pass = F.cross_entropy(model(ids[:-1].view(1, -1)).logits[0].double(), ids[1:], reduction="none")
    start = time.perf_counter()
    result, nll = evaluate_static(model, ids, batch_size=1, bptt=7)
    elapsed = time.perf_counter() - start
    torch.testing.assert_close(nll, one_pass, rtol=0, atol=1e-5)  # one stream, the state carried throughout
    assert result == summarize_chars(nll, result["seconds"]) and result["chars"] == 59
    assert 0 <= result["seconds"] <= elapsed
    settings = DynamicSettings(lr=0.01, decay=0.3, bptt=7, rms_windows=19)
    start = time.perf_counter()
    result, nll = evaluate_dynamic(model, ids, train, settings, train_batch_size=1, train_bptt=7)
    elapsed = time.perf_counter() - start
    expected = dynamic_char_nlls(model, ids, train, settings, train_batch_size=1, train_bptt=7)
    torch.testing.assert_close(nll, expected, rtol=0, atol=0)
    assert result == summarize_chars(nll, result["seconds"]) and result["chars"] == 59
    assert 0 <= result["seconds"] <= elapsed


def test_per_char_file_by_hand(tmp_path: Path) -> None:
    """One line per scored character, from position 1, the character escaped, the NLL to 9 digits; \\n ends
    each line (no \\r)."""
    vocab = Vocab.from_text("ab\n\\\té")
    ids = vocab.encode("a\nb\\é\t")
    write_char_nlls(tmp_path / "nll.csv", ids, vocab, torch.tensor([0.5, 1.25, 2.0, 1 / 3, 10.0],
                                                                    dtype=torch.float64))
    assert (tmp_path / "nll.csv").read_bytes() == (
        b"position,char,nll\n1,\\n,0.5\n2,b,1.25\n3,\\\\,2\n4,\\xe9,0.333333333\n5,\\t,10\n")
