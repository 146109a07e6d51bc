"""The edges of sampling's library functions (:mod:`charlm.generation.options`): every limit at its boundary with
its exact message, the draw at the ends of U[0, 1), the nucleus at a tie, and logits or temperatures at the ends of
float32. The CLI's side of the same limits is in ``test_sampling_options.py``."""

from __future__ import annotations

import math
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch

from charlm.generation.options import (
    MAX_LENGTH,
    MAX_NUM_SAMPLES,
    MAX_PRIME,
    MAX_SEED,
    check_options,
    check_prime,
    decode_escapes,
    draw,
    filtered_probs,
    pick,
    read_prime_file,
)
from charlm.util.errors import NOT_FINITE, CharlmError

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


def refused(message: str) -> AbstractContextManager[Any]:
    """Expect this exact message, whole."""
    return pytest.raises(CharlmError, match=f"^{re.escape(message)}$")


# ------------------------------------------------------------------------------------------------- limits
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"length": -1}, "--length must be >= 0, got -1"),
    ({"length": MAX_LENGTH + 1}, "--length must be at most 100,000,000, got 100,000,001"),
    ({"temperature": math.inf}, "--temperature must be a finite number >= 0 (0 is greedy), got inf"),
    ({"temperature": -0.5}, "--temperature must be >= 0, got -0.5"),
    ({"top_k": 0}, "--top-k must be at least 1, got 0"),
    ({"top_p": 0.0}, "--top-p must be a number above 0 and at most 1 (1 keeps every character), got 0.0"),
    ({"num_samples": 0}, "--num-samples must be at least 1, got 0"),
    ({"num_samples": MAX_NUM_SAMPLES + 1}, "--num-samples must be at most 10,000, got 10,001"),
    ({"num_samples": 2, "length": MAX_LENGTH // 2 + 1},
     "--num-samples x --length must be at most 100,000,000 characters (several samples are kept in memory until "
     "all are done), got 2 x 50,000,001; ask for fewer or shorter samples, or stream one long sample"),
    ({"beam": 10, "length": MAX_LENGTH // 10 + 1},
     "--beam x --length must be at most 100,000,000 characters (every beam is kept in memory until the search "
     "ends), got 10 x 10,000,001"),
    ({"seed": -1}, f"--seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got -1"),
    ({"seed": MAX_SEED + 1}, f"--seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {MAX_SEED + 1}"),
])
def test_each_limit_refused_just_past_it_in_one_sentence(kwargs: dict[str, float], message: str) -> None:
    options: dict[str, float] = {"length": 10, "temperature": 1.0, "top_k": None} | kwargs
    with refused(message):
        check_options(prefix="--", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    {"length": 0}, {"length": MAX_LENGTH}, {"temperature": 0.0}, {"top_k": 1}, {"top_p": 1.0},
    {"num_samples": MAX_NUM_SAMPLES, "length": 1}, {"num_samples": 2, "length": MAX_LENGTH // 2},
    {"beam": 10, "length": MAX_LENGTH // 10}, {"seed": 0}, {"seed": MAX_SEED},
    {"length": MAX_LENGTH // 2 + 1},  # one sample: only --length's own limit applies
])
def test_each_limit_accepts_its_boundary(kwargs: dict[str, float]) -> None:
    options: dict[str, float] = {"length": 10, "temperature": 1.0, "top_k": None} | kwargs
    check_options(**options)  # type: ignore[arg-type]


def test_the_library_names_options_without_dashes() -> None:
    with refused("length must be >= 0, got -1"):
        check_options(-1, 1.0, None)


def test_prime_limit_and_its_default_option_name(tmp_path: Path) -> None:
    check_prime("x" * MAX_PRIME)
    with refused("--prime is longer than 100,000 characters (100,001); give a shorter text"):
        check_prime("x" * (MAX_PRIME + 1))
    path = tmp_path / "prime.txt"
    path.write_text("x" * MAX_PRIME, encoding="utf-8")
    assert read_prime_file(path) == "x" * MAX_PRIME
    path.write_text("x" * (MAX_PRIME + 1), encoding="utf-8")
    with refused(f"--prime-file {path} is longer than 100,000 characters; give a shorter text"):
        read_prime_file(path)


# ------------------------------------------------------------------------------------------------- escapes
def test_escapes_up_to_the_last_unicode_character() -> None:
    assert decode_escapes("\\U0010ffff") == "\U0010ffff"
    with refused("text '\\U00110000' has the escape \\U00110000, beyond the last Unicode character (\\U0010ffff)"):
        decode_escapes("\\U00110000")
    with refused("text '\\q' has an unknown escape (\\q); known: \\n \\t \\r \\0 \\\\ \\' \\\" \\a \\b \\f \\v "
                 "\\xHH \\uHHHH \\UHHHHHHHH (write a backslash as \\\\)"):
        decode_escapes("\\q")


# ------------------------------------------------------------------------------------------------- the draw
def test_not_finite_scores_are_refused_with_the_message(generator: torch.Generator) -> None:
    with refused(NOT_FINITE):
        pick(torch.tensor([[0.0, math.nan]]), 0.0, None, generator)
    with refused(NOT_FINITE):
        draw(torch.tensor([[0.5, math.nan]]), generator)


def test_draw_is_the_first_running_sum_above_u_times_the_total() -> None:
    weights = torch.rand(500, 40, generator=torch.Generator().manual_seed(1))
    ids = draw(weights, torch.Generator().manual_seed(7))
    u = torch.rand((500, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    running = weights.double().cumsum(dim=-1)
    limits = u[:, 0] * running[:, -1]
    expected = torch.tensor([int(torch.nonzero(row > limit)[0]) for row, limit in zip(running, limits, strict=True)])
    assert torch.equal(ids, expected)


def test_draw_at_the_ends_of_u(monkeypatch: pytest.MonkeyPatch, generator: torch.Generator) -> None:
    weights = torch.tensor([[0.0, 0.0, 1.0, 3.0, 0.0]])
    for u, expected in [(0.0, 2), (math.nextafter(1.0, 0.0), 3)]:  # zero weights are never drawn
        monkeypatch.setattr(torch, "rand", lambda size, *, u=u, **_: torch.full(size, u, dtype=torch.float64))
        assert draw(weights, generator).tolist() == [expected]
    assert draw(torch.zeros(1, 4), generator).tolist() == [3]  # an all-zero row still names a character


def test_the_last_character_can_be_drawn(generator: torch.Generator) -> None:
    assert draw(torch.tensor([[0.0, 0.0, 2.0]] * 3), generator).tolist() == [2, 2, 2]


# ------------------------------------------------------------------------------------------------- the filters
def test_greedy_is_the_best_score_per_row(generator: torch.Generator) -> None:
    assert pick(torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 1.0]]), 0.0, None, generator).tolist() == [1, 0]


def test_top_k_filters_a_single_row() -> None:
    probs = filtered_probs(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), 1.0, top_k=2)
    assert probs[0, 1] == 0 and probs[0, 3] == 0 and probs[0, 0] > probs[0, 2] > 0
    assert torch.allclose(probs.sum(), torch.tensor(1.0))


def test_extreme_logits_give_a_finite_distribution() -> None:
    probs = filtered_probs(torch.tensor([[3e38, 0.0, -3e38]]), 1.0)
    assert probs.tolist() == [[1.0, 0.0, 0.0]]


def test_a_temperature_float32_cannot_hold_is_computed_in_float64() -> None:
    logits = torch.tensor([[0.0, -TINY]])  # the smallest normal gap, so flushing subnormals to 0 changes nothing
    assert filtered_probs(logits, 1.0).dtype == torch.float32
    assert filtered_probs(logits, TINY).dtype == torch.float32
    probs = filtered_probs(logits, TINY / 8)  # a subnormal temperature: float32 may flush it to 0
    assert probs.dtype == torch.float64
    assert probs[0, 1].item() == pytest.approx(math.exp(-8) / (1 + math.exp(-8)))


def test_top_p_one_keeps_a_tail_that_rounds_away() -> None:
    probs = filtered_probs(torch.tensor([[0.0, -23.0]]), 1.0, top_p=1.0)  # the cumsum is 1.0 in float32 at once
    assert probs[0, 1] > 0


def test_nucleus_at_a_tie_keeps_the_earliest_characters() -> None:
    # 128 equal probabilities (1/128 exactly): mass 0.25 is reached by exactly 32, and the stable order
    # keeps ids 0-31: the vocabulary's order breaks ties, so one seed gives one text
    probs = filtered_probs(torch.zeros(2, 128), 1.0, top_p=0.25)
    assert torch.equal(probs > 0, (torch.arange(128) < 32).expand(2, 128))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)
