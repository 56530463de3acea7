"""The evaluation arithmetic on hand-made scores whose answers are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from spin_ray.eval.metrics import (
    AVERAGE,
    Summary,
    WinRate,
    average_scores,
    best_of_n,
    bootstrap_mean_interval,
    drop_redundant_average,
    evaluate_models,
    select,
    summarise,
    tie_share,
    win_rate,
    win_rates,
    win_rates_against,
)


def test_average_column_reproduces_the_papers_sd15_row():
    # SPIN-Diffusion Table 1, SD-1.5 means: HPS 0.2699, Aesthetic 5.7691, ImageReward 0.8159,
    # PickScore 21.1983; Average = (0.2699 + 5.7691 + 0.8159 + 21.1983) / 4 = 7.0133.
    row = {"hpsv2": [0.2699], "aesthetic": [5.7691], "imagereward": [0.8159], "pickscore": [21.1983]}
    summary = summarise({name: np.array(values) for name, values in row.items()})
    assert summary[AVERAGE].mean == pytest.approx(7.0133, abs=5e-5)
    assert (summary["pickscore"].mean, summary["pickscore"].median) == (pytest.approx(21.1983),) * 2


# Two prompts, three images each. Raw averages per image:
#   prompt 0: (1+10)/2 = 5.5, (3+4)/2 = 3.5, (2+12)/2 = 7.0  -> image 2
#   prompt 1: (5+0)/2 = 2.5, (5+0)/2 = 2.5, (1+2)/2 = 1.5    -> tie of images 0 and 1: the first wins
SMALL = {"a": np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 1.0]]), "b": np.array([[10.0, 4.0, 12.0], [0.0, 0.0, 2.0]])}


def test_best_of_n_picks_highest_plain_average_first_on_ties():
    np.testing.assert_array_equal(average_scores(SMALL), [[5.5, 3.5, 7.0], [2.5, 2.5, 1.5]])
    indices = best_of_n(SMALL)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, [2, 0])
    assert select(SMALL, indices) == {"a": pytest.approx([2.0, 5.0]), "b": pytest.approx([12.0, 0.0])}


def test_normalised_average_stops_the_large_scale_scorer_from_deciding():
    # "big" is on a 100x scale and prefers image 0; "small1" and "small2" prefer image 1.
    scores = {
        "big": np.array([[300.0, 100.0]]),
        "small1": np.array([[0.0, 1.0]]),
        "small2": np.array([[0.0, 1.0]]),
    }
    assert best_of_n(scores)[0] == 0  # raw: (300+0+0)/3 = 100 > (100+1+1)/3 = 34
    # z-scores over each scorer's entries: big -> [1, -1], small -> [-1, 1]; averages -1/3 vs 1/3.
    np.testing.assert_allclose(average_scores(scores, normalise=True), [[-1 / 3, 1 / 3]])
    assert best_of_n(scores, normalise=True)[0] == 1


def test_normalised_average_of_a_constant_scorer_is_zero():
    scores = {"flat": np.full((2, 2), 7.0), "varied": np.array([[0.0, 2.0], [4.0, 6.0]])}
    # varied: mean 3, std sqrt(5); flat contributes 0.
    expected = (np.array([[0.0, 2.0], [4.0, 6.0]]) - 3.0) / np.sqrt(5.0) / 2
    np.testing.assert_allclose(average_scores(scores, normalise=True), expected)


def test_summarise_means_medians_and_average_of_each_statistic():
    summary = summarise({"x": np.array([1.0, 2.0, 9.0]), "y": np.array([4.0, 10.0, 4.0])})
    assert (summary["x"].mean, summary["x"].median) == (pytest.approx(4.0), pytest.approx(2.0))
    assert (summary["y"].mean, summary["y"].median) == (pytest.approx(6.0), pytest.approx(4.0))
    assert (summary[AVERAGE].mean, summary[AVERAGE].median) == (pytest.approx(5.0), pytest.approx(3.0))
    assert list(summary) == ["x", "y", AVERAGE]
    # Spread and interval: x's std is that of [1, 2, 9]; the Average's are those of the
    # per-prompt average [2.5, 6, 6.5], whose mean is the Average's mean.
    assert summary["x"].std == pytest.approx(np.std([1.0, 2.0, 9.0], ddof=1)) and summary["x"].n == 3
    assert summary[AVERAGE].std == pytest.approx(np.std([2.5, 6.0, 6.5], ddof=1)) and summary[AVERAGE].n == 3
    for row in summary.values():
        assert row.ci_low <= row.mean <= row.ci_high
    assert summary["x"].ci_low >= 1.0 and summary["x"].ci_high <= 9.0


def test_win_rate_counts_ties_as_half():
    model = np.array([3.0, 1.0, 2.0, 5.0])
    baseline = np.array([1.0, 2.0, 2.0, 4.0])  # win, loss, tie, win
    assert win_rate(model, baseline) == pytest.approx((2 + 0.5) / 4)
    assert tie_share(model, baseline) == pytest.approx(1 / 4)
    assert win_rate(baseline, model) == pytest.approx((1 + 0.5) / 4)
    assert win_rate(model, model) == 0.5 and tie_share(model, model) == 1.0


def test_win_rate_rejects_unpaired_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        win_rate(np.array([1.0, 2.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="same prompts"):
        win_rate(np.array([]), np.array([]))


def test_win_rates_per_metric_and_on_the_average():
    model = {"a": np.array([2.0, 0.0, 1.0]), "b": np.array([2.0, 9.0, 1.0])}
    baseline = {"a": np.array([1.0, 1.0, 1.0]), "b": np.array([2.0, 1.0, 3.0])}
    rates = win_rates(model, baseline)
    # a: win, loss, tie -> 1.5/3; b: tie, win, loss -> 1.5/3
    assert rates["a"] == WinRate(win_rate=pytest.approx(0.5), tie_share=pytest.approx(1 / 3), num_prompts=3)
    assert rates["b"] == WinRate(win_rate=pytest.approx(0.5), tie_share=pytest.approx(1 / 3), num_prompts=3)
    # averages: model [2, 4.5, 1] vs baseline [1.5, 1, 2] -> win, win, loss
    assert rates[AVERAGE] == WinRate(win_rate=pytest.approx(2 / 3), tie_share=0.0, num_prompts=3)


def test_evaluate_models_and_win_rates_against_baseline():
    scores = {
        "sd15": {"a": np.array([[1.0, 2.0], [0.0, 0.0]]), "b": np.array([[1.0, 0.0], [3.0, 1.0]])},
        "spin": {"a": np.array([[4.0, 2.0], [0.0, 1.0]]), "b": np.array([[0.0, 9.0], [1.0, 3.0]])},
    }
    evaluations = evaluate_models(scores)
    # sd15 averages: [[1, 1], [1.5, 0.5]] -> [0 (tie, first), 0]; spin: [[2, 5.5], [0.5, 2]] -> [1, 1]
    np.testing.assert_array_equal(evaluations["sd15"].best_indices, [0, 0])
    np.testing.assert_array_equal(evaluations["spin"].best_indices, [1, 1])
    assert evaluations["spin"].best_scores == {"a": pytest.approx([2.0, 1.0]), "b": pytest.approx([9.0, 3.0])}
    spin_a = evaluations["spin"].summary["a"]
    assert (spin_a.mean, spin_a.median, spin_a.n) == (pytest.approx(1.5), pytest.approx(1.5), 2)
    assert evaluations["spin"].summary[AVERAGE].mean == pytest.approx((1.5 + 6.0) / 2)

    rates = win_rates_against(evaluations, baseline="sd15")
    assert set(rates) == {"spin"}
    # a: spin [2, 1] vs sd15 [1, 0] -> 1.0; b: [9, 3] vs [1, 3] -> win, tie = 0.75 with half ties
    assert rates["spin"]["a"].win_rate == pytest.approx(1.0)
    assert rates["spin"]["b"] == WinRate(win_rate=pytest.approx(0.75), tie_share=pytest.approx(0.5), num_prompts=2)
    assert rates["spin"][AVERAGE].win_rate == pytest.approx(1.0)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="baseline model 'sd21'"):
        win_rates_against(evaluate_models({"sd15": SMALL}), baseline="sd21")
    with pytest.raises(ValueError, match="disagree on the shape"):
        best_of_n({"a": np.zeros((2, 3)), "b": np.zeros((2, 4))})
    with pytest.raises(ValueError, match="'a' have shape \\(3,\\); expected 2 dims"):
        best_of_n({"a": np.zeros(3)})
    with pytest.raises(ValueError, match="'b' contain NaN"):
        summarise({"a": np.zeros(2), "b": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="no scorers"):
        summarise({})
    with pytest.raises(ValueError, match="may not be named 'average'"):
        summarise({AVERAGE: np.zeros(2)})
    with pytest.raises(ValueError, match="one per prompt"):
        select(SMALL, np.array([0]))


# ----------------------------------------------------------------------------- bootstrap intervals


def test_bootstrap_interval_contains_the_mean_and_matches_std_and_n():
    values = np.random.default_rng(3).uniform(0.0, 1.0, size=50)
    interval = bootstrap_mean_interval(values)
    assert interval.mean == pytest.approx(values.mean())
    assert interval.low < interval.mean < interval.high
    assert interval.std == pytest.approx(values.std(ddof=1)) and interval.n == 50
    # The 95% interval of a mean is about +-1.96 standard errors wide.
    half_width = (interval.high - interval.low) / 2
    assert half_width == pytest.approx(1.96 * values.std() / np.sqrt(50), rel=0.2)


def test_bootstrap_interval_shrinks_with_more_prompts():
    rng = np.random.default_rng(0)
    widths = []
    for num_prompts in (10, 100, 1000):
        interval = bootstrap_mean_interval(rng.uniform(0.0, 1.0, size=num_prompts))
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(10.0, rel=0.35)  # 1 / sqrt(n)


def test_bootstrap_interval_is_deterministic_in_the_seed():
    values = np.arange(20.0) ** 1.5
    assert bootstrap_mean_interval(values, seed=7) == bootstrap_mean_interval(values, seed=7)
    assert bootstrap_mean_interval(values, seed=7) != bootstrap_mean_interval(values, seed=8)
    assert summarise({"a": values}) == summarise({"a": values})


def test_bootstrap_interval_of_one_or_equal_values_is_the_value():
    one = bootstrap_mean_interval(np.array([0.7]))
    assert (one.mean, one.low, one.high, one.std, one.n) == (pytest.approx(0.7),) * 3 + (0.0, 1)
    same = bootstrap_mean_interval(np.full(5, 0.25))
    assert same.low == same.high == pytest.approx(0.25)
    with pytest.raises(ValueError, match="at least one finite value"):
        bootstrap_mean_interval(np.array([]))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_interval(np.ones(3), confidence=1.5)


def test_the_average_column_is_dropped_only_when_it_repeats_one_scorer():
    one = {"base": {"toy": Summary(0.5, 0.5), AVERAGE: Summary(0.5, 0.5)}}
    assert drop_redundant_average(one) == {"base": {"toy": Summary(0.5, 0.5)}}
    two = {"base": {"a": Summary(1.0, 1.0), "b": Summary(3.0, 3.0), AVERAGE: Summary(2.0, 2.0)}}
    assert drop_redundant_average(two) == two
    assert drop_redundant_average({"base": {"toy": 0.5}}) == {"base": {"toy": 0.5}}
