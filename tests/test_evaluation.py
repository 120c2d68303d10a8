"""Metrics against hand-computed cases, the threshold rules, and the plots as real PNGs."""

from __future__ import annotations

import io
import json
import math
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from malaria.evaluation.metrics import (
    Confusion,
    evaluate,
    expected_calibration_error,
    roc_auc,
    roc_curve,
    worst_misclassified,
)
from malaria.evaluation.plots import (
    plot_confusion_matrix,
    plot_learning_curves,
    plot_roc,
    plot_worst_misclassified,
)
from malaria.evaluation.threshold import choose_threshold

# ------------------------------------------------------------------------------------- AUC


def test_auc_perfect_inverted_and_all_tied() -> None:
    y = [0, 0, 0, 1, 1]
    assert roc_auc(y, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert roc_auc(y, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5] * 5) == 0.5  # a constant score cannot rank: ties count one half


def test_auc_known_values_with_and_without_ties() -> None:
    # The classic example (scikit-learn's docs): 3 of 4 pairs ranked right.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # Pairs (pos, neg): (.5,.5) tie -> 1/2, (.5,.2) 1, (.9,.5) 1, (.9,.2) 1 -> 3.5 / 4.
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)


def test_auc_is_nan_with_one_class_and_curve_refuses() -> None:
    assert math.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([0, 0], [0.1, 0.2])


def _pairwise_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 1.0])),
        min_size=2, max_size=40,
    ).filter(lambda rows: len({label for label, _ in rows}) == 2)
)
def test_rank_auc_equals_pairwise_and_trapezoid_area(rows: list[tuple[int, float]]) -> None:
    # Few distinct scores, so ties are frequent: the rank formula must handle them exactly.
    y = np.array([label for label, _ in rows])
    p = np.array([score for _, score in rows])
    auc = roc_auc(y, p)
    assert auc == pytest.approx(_pairwise_auc(y, p), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, p)
    assert auc == pytest.approx(float(np.trapezoid(tpr, fpr)), abs=1e-12)


def test_roc_curve_points() -> None:
    fpr, tpr, thresholds = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert thresholds[0] == np.inf
    np.testing.assert_allclose(thresholds[1:], [0.8, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])


# ------------------------------------------------------------------------ report at threshold


def _from_confusion(tn: int, fp: int, fn: int, tp: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities (0.2 / 0.8) that give exactly these counts at 0.5."""
    y = np.array([0] * (tn + fp) + [1] * (fn + tp))
    prob = np.array([0.2] * tn + [0.8] * fp + [0.2] * fn + [0.8] * tp)
    return y, prob


def test_metrics_from_a_hand_computed_confusion() -> None:
    y, prob = _from_confusion(tn=5, fp=1, fn=2, tp=4)
    report = evaluate(y, prob, 0.5)
    assert report.confusion == Confusion(tn=5, fp=1, fn=2, tp=4)
    assert report.n == 12
    assert report.accuracy == pytest.approx(9 / 12)
    assert report.sensitivity == pytest.approx(4 / 6)
    assert report.specificity == pytest.approx(5 / 6)
    assert report.precision == pytest.approx(4 / 5)
    assert report.f1 == pytest.approx(8 / 11)
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 18 / sqrt(1260)
    assert report.mcc == pytest.approx(18 / math.sqrt(1260))
    np.testing.assert_array_equal(report.confusion.as_array(), [[5, 1], [2, 4]])


def test_mcc_extremes_and_the_degenerate_predictor() -> None:
    y = np.array([0, 0, 1, 1])
    assert evaluate(y, [0.1, 0.2, 0.9, 0.8], 0.5).mcc == pytest.approx(1.0)
    assert evaluate(y, [0.9, 0.8, 0.1, 0.2], 0.5).mcc == pytest.approx(-1.0)
    everything_positive = evaluate(y, [0.9, 0.9, 0.9, 0.9], 0.5)
    assert everything_positive.mcc == 0.0  # no information, by convention
    nothing_positive = evaluate(y, [0.1] * 4, 0.5)
    assert math.isnan(nothing_positive.precision)
    assert nothing_positive.specificity == 1.0 and nothing_positive.sensitivity == 0.0


def test_threshold_is_inclusive() -> None:
    report = evaluate([0, 1], [0.3, 0.5], 0.5)
    assert report.confusion == Confusion(tn=1, fp=0, fn=0, tp=1)


def test_ece_of_calibrated_and_overconfident_predictors() -> None:
    # Calibrated: of cells given 0.3, 30% are parasitized; of those given 0.8, 80%.
    y = np.array([1] * 3 + [0] * 7 + [1] * 8 + [0] * 2)
    prob = np.array([0.3] * 10 + [0.8] * 10)
    assert expected_calibration_error(y, prob) == pytest.approx(0.0, abs=1e-12)
    # Overconfident: says 0.99 for everything, but only 70% are parasitized.
    y = np.array([1] * 7 + [0] * 3)
    assert expected_calibration_error(y, np.full(10, 0.99)) == pytest.approx(0.29)
    # Two bins, weighted by size: 4 cells at 0.1 with 1 positive (gap 0.15),
    # 6 cells at 0.9 with 6 positives (gap 0.1) -> 0.4 * 0.15 + 0.6 * 0.1 = 0.12.
    y = np.array([1, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    prob = np.array([0.1] * 4 + [0.9] * 6)
    assert expected_calibration_error(y, prob) == pytest.approx(0.12)
    assert evaluate(y, prob, 0.5).ece == pytest.approx(0.12)


def test_ece_uses_fifteen_bins() -> None:
    # 0.30 and 0.32 share the bin [0.2667, 0.3333): their errors cancel inside it.
    assert expected_calibration_error([0, 1], [0.30, 0.32]) == pytest.approx(
        abs(0.5 - 0.31)
    )
    # 0.30 and 0.34 fall in different bins and are judged apart.
    assert expected_calibration_error([0, 1], [0.30, 0.34]) == pytest.approx(
        (0.30 + 0.66) / 2
    )


def test_per_slide_table_min_median() -> None:
    y = [1, 1, 0, 0, 1, 0, 0, 0, 0]
    prob = [0.9, 0.2, 0.1, 0.1, 0.7, 0.6, 0.4, 0.3, 0.2]
    slides = ["B", "B", "B", "B", "A", "A", "C", "C", "C"]
    report = evaluate(y, prob, 0.5, slides=slides)
    rows = {row.slide: row for row in report.per_slide}
    assert [row.slide for row in report.per_slide] == ["A", "B", "C"]
    assert (rows["A"].cells, rows["A"].accuracy) == (2, 0.5)
    assert rows["A"].parasitized_true == 0.5 and rows["A"].parasitized_pred == 1.0
    assert (rows["B"].cells, rows["B"].accuracy) == (4, 0.75)
    assert rows["B"].parasitized_true == 0.5 and rows["B"].parasitized_pred == 0.25
    assert rows["C"].accuracy == 1.0 and rows["C"].parasitized_pred == 0.0
    assert report.slide_accuracy_min == 0.5
    assert report.slide_accuracy_median == 0.75
    with pytest.raises(ValueError, match="slides"):
        evaluate(y, prob, 0.5, slides=slides[:-1])


def test_to_dict_is_strict_json() -> None:
    report = evaluate([1, 1, 1], [0.9, 0.8, 0.2], 0.5, slides=["s1", "s1", "s2"])
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)  # NaN would break strict JSON readers
    assert json.loads(text) == data
    assert data["roc_auc"] is None and data["specificity"] is None  # undefined: one class
    assert data["confusion"] == {"tn": 0, "fp": 0, "fn": 1, "tp": 2}
    assert data["per_slide"][1] == {
        "slide": "s2", "cells": 1, "accuracy": 0.0,
        "parasitized_true": 1.0, "parasitized_pred": 0.0,
    }
    assert data["slide_accuracy_min"] == 0.0
    no_slides = evaluate([0, 1], [0.2, 0.7], 0.5).to_dict()
    assert no_slides["per_slide"] == [] and no_slides["slide_accuracy_min"] is None


@pytest.mark.parametrize(
    ("y", "prob", "message"),
    [
        ([0, 1], [0.5], "labels"),
        ([0, 2], [0.1, 0.2], "only 0"),
        ([0, 1], [0.1, 1.2], r"\[0, 1\]"),
        ([0, 1], [0.1, math.nan], "NaN"),
        ([], [], "no samples"),
    ],
)
def test_bad_inputs_are_refused(y: list[int], prob: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(y, prob, 0.5)


# ------------------------------------------------------------------------------- threshold


def test_threshold_sits_in_the_gap_of_separable_validation_data() -> None:
    y = [0, 0, 0, 1, 1, 1]
    prob = [0.05, 0.1, 0.2, 0.6, 0.7, 0.95]
    for rule in ("youden", "max_accuracy", "min_sensitivity"):
        t = choose_threshold(y, prob, rule=rule, min_sensitivity=1.0)  # type: ignore[arg-type]
        assert t == pytest.approx(0.4)  # midpoint of 0.2 and 0.6: a margin on both sides
        assert evaluate(y, prob, t).accuracy == 1.0


def test_rules_differ_where_they_should() -> None:
    # Validation: 4 parasitized, 8 uninfected.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    prob = np.array([0.9, 0.8, 0.45, 0.15, 0.5, 0.3, 0.25, 0.2, 0.1, 0.1, 0.05, 0.02])
    # Youden: at t=0.35 sens 3/4, spec 7/8 (J=0.625); at t=0.125 sens 1, spec 4/8 (J=0.5);
    # at t=0.475 sens 1/2, spec 7/8 (J=0.375).
    assert choose_threshold(y, prob, rule="youden") == pytest.approx((0.3 + 0.45) / 2)
    # Accuracy: t=0.375 (3 TP, 7 TN) and t=0.65 (2 TP, 8 TN) both give 10/12; the tie goes
    # to the candidate nearest 0.5.
    t_acc = choose_threshold(y, prob, rule="max_accuracy")
    assert evaluate(y, prob, t_acc).accuracy == pytest.approx(10 / 12)
    assert evaluate(y, prob, 0.65).accuracy == pytest.approx(10 / 12)
    assert t_acc == pytest.approx(0.375)
    # Screening: every parasitized cell found, with the most specificity that allows.
    t_sens = choose_threshold(y, prob, rule="min_sensitivity", min_sensitivity=0.96)
    assert t_sens == pytest.approx((0.1 + 0.15) / 2)
    report = evaluate(y, prob, t_sens)
    assert report.sensitivity == 1.0 and report.specificity == pytest.approx(4 / 8)
    # A lower bar (3 of 4) buys specificity.
    t_75 = choose_threshold(y, prob, rule="min_sensitivity", min_sensitivity=0.75)
    assert evaluate(y, prob, t_75).specificity == pytest.approx(7 / 8)


def test_threshold_comes_only_from_the_validation_data() -> None:
    rng = np.random.default_rng(7)
    y_val = rng.integers(0, 2, 300)
    p_val = np.clip(0.55 * y_val + rng.normal(0.2, 0.15, 300), 0, 1)
    y_test = rng.integers(0, 2, 300)
    p_test = np.clip(0.55 * y_test + rng.normal(0.3, 0.15, 300), 0, 1)  # a shifted stain
    t = choose_threshold(y_val, p_val, rule="youden")
    # Same validation data, same threshold, whatever the test set is.
    assert choose_threshold(y_val.copy(), p_val.copy(), rule="youden") == t
    # Test-optimal is different; choosing on test would have flattered the model.
    t_test = choose_threshold(y_test, p_test, rule="youden")
    assert t_test != t
    honest = evaluate(y_test, p_test, t)
    peeked = evaluate(y_test, p_test, t_test)
    assert honest.sensitivity + honest.specificity <= peeked.sensitivity + peeked.specificity
    # The chosen threshold lies between two adjacent validation scores.
    below, above = p_val[p_val < t].max(), p_val[p_val >= t].min()
    assert t == pytest.approx((below + above) / 2)


def test_the_fixed_rule_is_the_default_threshold_whatever_the_scores() -> None:
    from malaria.core.defaults import DEFAULT_THRESHOLD, THRESHOLD_RULE
    from malaria.evaluation.threshold import rule_origin

    y = [0, 0, 0, 1, 1, 1]
    for prob in ([0.05, 0.1, 0.2, 0.6, 0.7, 0.95], [0.7, 0.8, 0.85, 0.9, 0.95, 0.99]):
        assert choose_threshold(y, prob, rule="fixed") == DEFAULT_THRESHOLD == 0.5
    assert THRESHOLD_RULE == "fixed"  # the product's rule (benchmarks/README.md: the CV)
    assert choose_threshold(y, [0.7, 0.8, 0.85, 0.9, 0.95, 0.99]) == 0.5
    with pytest.raises(ValueError, match="both classes"):  # still a validation problem
        choose_threshold([1, 1], [0.4, 0.9], rule="fixed")
    assert rule_origin("fixed") == "fixed"
    assert rule_origin("youden") == "youden, from validation slides"


def test_threshold_refuses_one_class_and_bad_rules() -> None:
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1], [0.4, 0.9])
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold([0, 1], [0.4, 0.9], rule="f1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_sensitivity"):
        choose_threshold([0, 1], [0.4, 0.9], rule="min_sensitivity", min_sensitivity=0.0)


def test_threshold_at_the_ends_of_the_scale() -> None:
    # Scores at exactly 0 and 1: candidates must still separate them.
    t = choose_threshold([0, 0, 1], [0.0, 0.0, 1.0], rule="youden")
    assert 0.0 < t <= 1.0 and evaluate([0, 0, 1], [0.0, 0.0, 1.0], t).accuracy == 1.0


# ------------------------------------------------------------------------------------ plots


def _decode_png(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.width > 100 and image.height > 50
    return image


def test_learning_curves_png_from_history_list_and_dict() -> None:
    history = [
        {"loss": 0.7, "val_loss": 0.65, "accuracy": 0.55, "val_accuracy": 0.6, "lr": 1e-3},
        {"loss": 0.4, "val_loss": 0.35, "accuracy": 0.82, "val_accuracy": 0.85, "lr": 5e-4},
        {"loss": 0.3, "val_loss": 0.38, "accuracy": 0.88, "val_accuracy": 0.84, "lr": 2.5e-4},
    ]
    wide = _decode_png(plot_learning_curves(history))
    assert wide.width > wide.height  # loss, accuracy and lr side by side
    columns = {key: [epoch[key] for epoch in history] for key in history[0]}
    _decode_png(plot_learning_curves(columns))
    # A first epoch without validation, and Keras 3's "learning_rate" name.
    _decode_png(plot_learning_curves([{"loss": 1.0, "learning_rate": 0.01},
                                      {"loss": 0.5, "val_loss": 0.6, "learning_rate": 0.01}]))
    # What malaria.model.trainer records: 1-based epochs and timings that are not curves.
    _decode_png(plot_learning_curves([
        {**logs, "epoch": i + 1, "epoch_seconds": 12.5, "images_per_s": 480.0}
        for i, logs in enumerate(history)
    ]))
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curves([])
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_learning_curves([{"epoch_seconds": 3.0}])


def test_roc_and_confusion_pngs_are_deterministic() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    prob = np.clip(0.4 * y + rng.uniform(0, 0.6, 200), 0, 1)
    roc = plot_roc(y, prob, threshold=0.5)
    _decode_png(roc)
    assert plot_roc(y, prob, threshold=0.5) == roc  # same inputs, same bytes
    report = evaluate(y, prob, 0.5)
    _decode_png(plot_confusion_matrix(report))
    _decode_png(plot_confusion_matrix(Confusion(tn=0, fp=0, fn=3, tp=7)))  # an empty row


def test_worst_misclassified_order_and_montage() -> None:
    y = np.array([1, 0, 1, 0, 1, 0])
    prob = np.array([0.05, 0.97, 0.4, 0.7, 0.9, 0.1])
    # Mistakes: 0 (p 0.05 for parasitized, margin 0.45), 1 (0.97, margin 0.47),
    # 2 (0.4, margin 0.1), 3 (0.7 for uninfected, margin 0.2).
    np.testing.assert_array_equal(worst_misclassified(y, prob, 0.5), [1, 0, 3, 2])
    np.testing.assert_array_equal(worst_misclassified(y, prob, 0.5, limit=2), [1, 0])

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for h, w in product((40, 64), (48, 30, 64))]
    images[3] = images[3][:, :, 0]  # a grey cell among RGB ones
    names = [f"slide{i}/cell{i}.png" for i in range(6)]
    montage = _decode_png(plot_worst_misclassified(images, y, prob, 0.5, names=names))
    assert montage.width > 300
    _decode_png(plot_worst_misclassified(np.stack([images[5]] * 6), y, prob, 0.5, columns=2))


def test_montage_without_mistakes_and_bad_images() -> None:
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    data = plot_worst_misclassified(images, [0, 1], [0.1, 0.9], 0.5)
    assert Image.open(io.BytesIO(data)).format == "PNG"
    with pytest.raises(ValueError, match="images"):
        plot_worst_misclassified(images[:1], [0, 1], [0.1, 0.9], 0.5)
    with pytest.raises(ValueError, match="uint8"):
        plot_worst_misclassified(images.astype(np.float32), [0, 1], [0.9, 0.1], 0.5)


def test_parasitemia_error_sits_beside_accuracy_and_auc() -> None:
    # Slide s1: 2 of 4 labelled parasitized, 1 called -> 25 points; s2: 0 of 2, 0 called.
    report = evaluate([1, 1, 0, 0, 0, 0], [0.9, 0.2, 0.1, 0.3, 0.1, 0.2], 0.5,
                      slides=["s1"] * 4 + ["s2"] * 2)
    data = report.to_dict()
    assert data["parasitemia_error_mean"] == pytest.approx(12.5)
    assert data["parasitemia_error_max"] == pytest.approx(25.0)
    no_slides = evaluate([0, 1], [0.2, 0.7], 0.5).to_dict()
    assert no_slides["parasitemia_error_mean"] is None
    assert no_slides["parasitemia_error_max"] is None


def test_the_report_table_and_evaluate_json_show_parasitemia_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``malaria evaluate`` (model scoring stood in) prints the training report's table and
    writes the keys the issue names."""
    import malaria.model.local as local
    from malaria.model.candidate import metrics_table
    from malaria_cli.main import main

    report = evaluate([1, 1, 0, 0, 1, 0], [0.9, 0.2, 0.1, 0.3, 0.8, 0.2], 0.5,
                      slides=["s1"] * 4 + ["s2"] * 2)
    table = metrics_table(report)
    assert "| per-slide parasitemia error, mean (percentage points) | 12.50 |" in table
    assert "| per-slide parasitemia error, max (percentage points) | 25.00 |" in table

    monkeypatch.setattr(local, "evaluate_local", lambda *args, **kwargs: report)
    monkeypatch.setenv("MALARIA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", "m.keras", "--data", str(tmp_path),
                 "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "slide_accuracy_min",
                "parasitemia_error_mean", "parasitemia_error_max"):
        assert written[key] is not None, key
    assert written["parasitemia_error_max"] == pytest.approx(25.0)
    assert "parasitemia error, max" in capsys.readouterr().out
