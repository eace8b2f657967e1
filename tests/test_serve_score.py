"""serving/score.py without a server: option log-likelihoods read from vLLM-shaped replies, and the comparison rule."""

from __future__ import annotations

import math

import pytest

from harness.commonsense import MCEvaluation
from serving.score import _option_logprob, compare


def _evaluation(scores: list[list[float]]) -> MCEvaluation:
    return MCEvaluation(
        uids=[f"q{i}" for i in range(len(scores))],
        sources=["s"] * len(scores),
        labels=[0] * len(scores),
        predictions=[max(range(len(row)), key=row.__getitem__) for row in scores],
        scores=scores,
    )


def test_option_logprob_sums_the_candidate_positions_of_a_vllm_reply():
    # vLLM's JSON: one entry per prompt token (None for the first), keyed by token id as a string.
    choice = {"prompt_logprobs": [None, {"7": {"logprob": -9.0}}, {"3": {"logprob": -0.5}}, {"4": {"logprob": -1.25}}]}
    assert _option_logprob(choice, prompt_len=2, candidate=[3, 4]) == -1.75
    with pytest.raises(RuntimeError, match="lack the prompt token 5"):
        _option_logprob(choice, prompt_len=2, candidate=[5, 4])
    with pytest.raises(RuntimeError, match="no prompt_logprobs"):
        _option_logprob({"text": ""}, prompt_len=2, candidate=[3])


def test_predictions_may_differ_only_on_near_ties():
    adapter = _evaluation([[-1.0, -3.0], [-2.0, -2.004], [-5.0, -1.0]])
    served = _evaluation([[-1.0001, -3.0], [-2.005, -2.004], [-5.0, -1.0]])  # q1 flips inside the tie
    check = compare(adapter, served, tie=1e-2)
    assert (check.n, check.near_ties, check.disagreements, check.unexplained) == (3, 1, 1, 0)
    assert check.consistent and math.isclose(check.max_score_difference, 0.005, rel_tol=1e-9)

    flipped = _evaluation([[-3.0, -1.0], [-2.0, -2.004], [-5.0, -1.0]])  # q0: a clear preference reversed
    wrong = compare(adapter, flipped, tie=1e-2)
    assert wrong.unexplained == 1 and not wrong.consistent
    assert "1 outside the 1 near-ties" in wrong.summary()

    with pytest.raises(ValueError, match="same questions"):
        compare(adapter, _evaluation([[-1.0, -2.0]]))


def test_the_main_job_ends_on_served_accuracy_beside_the_adapters_and_fails_on_a_real_disagreement(capsys):
    from serving.full_loop import report

    before = _evaluation([[-2.0, -1.0], [-1.0, -2.0], [-3.0, -1.0]])  # predicts 1, 0, 1: accuracy 1/3
    after = _evaluation([[-1.0, -2.0], [-1.0, -2.0], [-3.0, -1.0]])  # 0, 0, 1: 2/3
    scores = {"before": before, "after": after}
    assert report(scores, _evaluation([[-1.0, -2.0], [-1.0, -2.0], [-3.0, -1.0]]), 1.0) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-5:-1] == [
        "base model (before training)       0.333",
        "adapter after training (PEFT)      0.667",
        "merged model served by vLLM        0.667",
        "served vs adapter: 0 of 3 predictions differ (0 outside the 0 near-ties, margin < 0.01 nats); "
        "largest option score difference 0.00e+00",
    ]
    assert report(scores, _evaluation([[-2.0, -1.0], [-1.0, -2.0], [-3.0, -1.0]]), 1.0) == 1
    assert "predicts differently from the adapter on 1 questions" in capsys.readouterr().err


def test_evaluations_round_trip_through_json_as_the_training_step_writes_them():
    import json

    evaluation = _evaluation([[-1.5, -2.25], [-0.125, -3.0]])
    evaluation.per_source["s"] = 0.5
    assert MCEvaluation.from_json(json.loads(json.dumps(evaluation.to_json()))) == evaluation
