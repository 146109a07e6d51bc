"""The frontier's transformer is scored by charlm's own evaluation: every character once, causally."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.transformer import CharTransformer, TransformerConfig, _EvalAdapter, schedule
from charlm.evaluation.scoring import evaluate_ids


def test_windowed_scoring_equals_one_causal_pass_when_the_context_fits() -> None:
    torch.manual_seed(0)
    model = CharTransformer(11, TransformerConfig(layers=2, width=16, heads=2, block=64)).eval()
    ids = torch.randint(0, 11, (50,))
    with torch.no_grad():  # the whole text in one pass: each position sees everything before it
        whole = F.cross_entropy(model(ids[None, :-1])[0], ids[1:]).item()
    scored = evaluate_ids(_EvalAdapter(model), ids, batch_size=1, bptt=8)  # windows of 8, context carried
    assert scored["chars"] == 49
    assert abs(scored["loss"] - whole) < 1e-5


def test_no_prediction_depends_on_a_later_character() -> None:
    torch.manual_seed(1)
    model = _EvalAdapter(CharTransformer(7, TransformerConfig(layers=1, width=8, heads=2, block=8)).eval())
    ids = torch.randint(0, 7, (1, 12))
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 7
    with torch.no_grad():
        first = model(ids[:, :6])  # two windows, the second reading the first's context as its state
        a, b = model(ids[:, 6:], first.states), model(changed[:, 6:], first.states)
    assert torch.equal(a.logits[:, :3], b.logits[:, :3])  # positions 6..8 come before the change
    assert not torch.equal(a.logits[:, 3:], b.logits[:, 3:])


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    assert schedule(0, 100, 10) == 0.1 and schedule(9, 100, 10) == 1.0
    assert abs(schedule(100, 100, 10) - 0.1) < 1e-12 and schedule(55, 100, 10) < 1.0
