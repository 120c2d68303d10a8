"""Drift notes: the same distribution is stable, a shifted one is flagged."""

from __future__ import annotations

import numpy as np

from malaria.evaluation.drift import compare, drift_of_predictions, psi, reference_distribution
from malaria.io.store import LocalStore


def _rows(probabilities: np.ndarray, threshold: float) -> list[dict[str, str]]:
    return [{"probability": f"{p:.6f}", "error": "",
             "predicted_class": "Parasitized" if p >= threshold else "Uninfected"}
            for p in probabilities]


def _csv(rows: list[dict[str, str]]) -> bytes:
    lines = ["probability,error,predicted_class"]
    lines += [f"{r['probability']},{r['error']},{r['predicted_class']}" for r in rows]
    return ("\n".join(lines) + "\n").encode()


def test_psi_is_zero_for_identical_and_large_for_opposite() -> None:
    assert psi([10, 20, 30], [10, 20, 30]) == 0
    assert psi([100, 0, 0], [0, 0, 100]) > 1


def test_same_population_is_stable_shifted_one_is_flagged(local_store: LocalStore) -> None:
    rng = np.random.default_rng(0)
    validation = np.concatenate([rng.beta(1, 12, 600), rng.beta(12, 1, 400)])
    reference = reference_distribution(validation, 0.5)
    assert reference["positive_rate"] == (validation >= 0.5).mean()

    tonight = np.concatenate([rng.beta(1, 12, 300), rng.beta(12, 1, 200)])
    local_store.put_bytes("predictions/1.csv", _csv(_rows(tonight, 0.5)))
    stable = drift_of_predictions(local_store, ["predictions/1.csv"], reference)
    assert not stable.flagged and stable.cells == 500 and stable.psi is not None
    assert stable.psi < 0.1

    washed_out = rng.beta(4, 4, 500)  # a new stain: everything looks uncertain
    local_store.put_bytes("predictions/2.csv", _csv(_rows(washed_out, 0.5)))
    drifted = drift_of_predictions(local_store, ["predictions/2.csv"], reference)
    assert drifted.flagged and "PSI" in drifted.message


def test_no_reference_is_reported_not_flagged() -> None:
    report = compare(None, [1, 2, 3], positives=1)
    assert not report.flagged and "no reference" in report.message


def test_reference_and_scores_bin_a_probability_on_an_edge_alike(
        local_store: LocalStore) -> None:
    edges = np.array([0.0, 0.1, 0.3, 0.7, 0.9, 1.0])  # 0.3 * 20 is 6.000000000000001
    reference = reference_distribution(edges, 0.5)
    local_store.put_bytes("predictions/edges.csv", _csv(_rows(edges, 0.5)))

    report = drift_of_predictions(local_store, ["predictions/edges.csv"], reference)

    expected = [0] * 20
    for index in (0, 2, 6, 14, 18, 19):  # bin i holds [i/20, (i+1)/20); 1.0 the last
        expected[index] = 1
    assert reference["counts"] == expected
    assert report.psi == 0.0
