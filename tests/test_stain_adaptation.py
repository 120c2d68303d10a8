"""Issue 15's experiments: stain jitter in optical density (a Keras layer), per-slide
test-time adaptation (colour statistics, AdaBN) and the benchmark's comparison of variants
over the same cross-validation folds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from malaria.evaluation import adaptation
from malaria.evaluation.adaptation import (
    ColourStats,
    adapted_batchnorm,
    batchnorm_layers,
    colour_stats,
    predict_by_slide,
    standardise_colour,
)
from malaria.model.architectures import build_model
from malaria.model.predict import predict_probabilities
from malaria.model.stain import BACKGROUND_LEVEL, OD_EPSILON, RGB_FROM_HED, RandomHEDJitter

SIZE = 32


def cells(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Pinkish 'cells' (a disc of stained pixels) on black padding, uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2
    base = np.array([200, 130, 150], dtype=np.float64)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    noise = rng.normal(0, 15, (n, size, size, 3))
    images[:, disc] = np.clip(base + noise[:, disc], 20, 255).astype(np.uint8)
    return images


# ------------------------------------------------------------------------ HED jitter


def test_hed_jitter_is_the_identity_at_inference() -> None:
    layer = RandomHEDJitter(0.2, 0.2, seed=1)
    x = cells(4).astype("float32") / 255
    assert np.array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    assert np.array_equal(keras.ops.convert_to_numpy(layer(x)), x)


def test_zero_jitter_gives_back_the_input_through_the_stain_space() -> None:
    # The deconvolution and its inverse, with the epsilon taken out again, round-trip.
    x = cells(3).astype("float32") / 255
    out = keras.ops.convert_to_numpy(RandomHEDJitter(0.0, 0.0)._jitter(x))
    np.testing.assert_allclose(out, x, atol=1e-5)


def test_hed_jitter_keeps_padding_black_and_stays_within_bounds() -> None:
    scale = shift = 0.05
    layer = RandomHEDJitter(scale, shift, seed=3)
    x = cells(16).astype("float32") / 255
    out = keras.ops.convert_to_numpy(layer(x, training=True))

    padding = x.max(axis=-1) <= BACKGROUND_LEVEL
    assert padding.any()
    assert np.array_equal(out[padding], x[padding])  # black stays black, exactly
    assert not np.allclose(out[~padding], x[~padding], atol=1e-3)  # the cells do change
    assert out.min() >= 0 and out.max() <= 1
    # Bound on the change of optical density: each stain density s moves by at most
    # scale * |s| + shift, and an RGB density is a sum of the three stains' contributions.
    od_in = -np.log(x[~padding].astype(np.float64) + OD_EPSILON)
    od_out = -np.log(out[~padding].astype(np.float64) + OD_EPSILON)
    stains = od_in @ np.linalg.inv(RGB_FROM_HED)
    bound = (scale * np.abs(stains) + shift) @ np.abs(RGB_FROM_HED)
    assert np.all(np.abs(od_out - od_in) <= bound + 1e-3)
    # Per image: two copies of one image get different jitter.
    twins = np.repeat(x[:1], 2, axis=0)
    a, b = keras.ops.convert_to_numpy(RandomHEDJitter(scale, shift, seed=4)(twins,
                                                                             training=True))
    assert not np.allclose(a, b)


def test_hed_architectures_train_mode_only_and_round_trip(tmp_path: Path) -> None:
    model = build_model("cellnet-hed", SIZE, seed=2)
    assert isinstance(model.get_layer("aug_hed"), RandomHEDJitter)
    only = build_model("cellnet-hed-only", SIZE)
    names = {layer.name for layer in only.layers}
    assert "aug_hed" in names and "aug_hue" not in names and "aug_flip" in names
    assert model.count_params() == build_model("cellnet", SIZE).count_params()
    strong = build_model("cellnet-hed-strong", SIZE).get_layer("aug_hed")
    assert (strong.scale, strong.shift) == (0.2, 0.2)
    images = np.concatenate([cells(6, size=SIZE), cells(2, 1, size=SIZE)])
    path = tmp_path / "hed.keras"
    model.save(path)

    loaded = keras.models.load_model(path, safe_mode=True, compile=False)

    layer = loaded.get_layer("aug_hed")
    assert isinstance(layer, RandomHEDJitter)
    assert (layer.scale, layer.shift, layer.background) == (0.05, 0.05, BACKGROUND_LEVEL)
    np.testing.assert_allclose(predict_probabilities(loaded, images),
                               predict_probabilities(model, images), atol=1e-6)


# ------------------------------------------------------------------ colour adaptation


def test_colour_adaptation_maps_a_slides_statistics_to_the_reference() -> None:
    reference = colour_stats(cells(40, seed=1))
    slide = cells(30, seed=2).astype(np.float64)
    inside = slide.max(axis=-1) > 0
    # A different stain and lamp: a gain and an offset per channel, on the cells only.
    slide[inside] = np.clip(slide[inside] * [0.8, 1.1, 0.9] + [-15, 10, 5], 12, 255)
    slide = slide.astype(np.uint8)
    assert not np.allclose(colour_stats(slide).mean, reference.mean, atol=5)

    out = standardise_colour(slide, reference)

    got = colour_stats(out)
    np.testing.assert_allclose(got.mean, reference.mean, atol=0.6)
    np.testing.assert_allclose(got.std, reference.std, rtol=0.02)
    padding = slide.max(axis=-1) <= adaptation.BACKGROUND_UINT8
    assert np.array_equal(out[padding], slide[padding])
    assert ColourStats.from_dict(json.loads(json.dumps(reference.to_dict()))) == reference
    assert pytest.approx(BACKGROUND_LEVEL) == adaptation.BACKGROUND_UINT8 / 255


def test_colour_adaptation_is_per_slide() -> None:
    reference = colour_stats(cells(20, seed=1))
    a, b = cells(10, seed=3), (cells(10, seed=4) // 2)
    both = np.concatenate([a, b])
    model = build_model("cellnet-tiny", 32, augment=False)

    together = predict_by_slide(model, both, ["a"] * 10 + ["b"] * 10, adapt="colour",
                                reference=reference)

    alone = predict_by_slide(model, b, ["b"] * 10, adapt="colour", reference=reference)
    np.testing.assert_allclose(together[10:], alone, atol=1e-6)
    with pytest.raises(ValueError, match="colour statistics"):
        predict_by_slide(model, both, ["a"] * 20, adapt="colour")


# ------------------------------------------------------------------------------ AdaBN


def _bn_values(model: keras.Model) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v).copy() for bn in batchnorm_layers(model)
            for v in (bn.moving_mean, bn.moving_variance)]


def test_adabn_changes_only_bn_statistics_and_restores_them() -> None:
    model = build_model("cellnet-tiny", 32, augment=False)
    assert len(batchnorm_layers(model)) == 3
    before = [w.copy() for w in model.get_weights()]
    bn_before = _bn_values(model)
    bn_ids = {id(v) for bn in batchnorm_layers(model)
              for v in (bn.moving_mean, bn.moving_variance)}
    images = cells(37, seed=5)

    with adapted_batchnorm(model, images, chunk=16):
        inside = {id(v): keras.ops.convert_to_numpy(v) for v in model.weights}
        changed = {i for i, v in enumerate(model.weights)
                   if not np.array_equal(inside[id(v)], before[i])}
        assert changed and all(id(model.weights[i]) in bn_ids for i in changed)

    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(_bn_values(model), bn_before,
                                                    strict=True))
    with pytest.raises(RuntimeError), adapted_batchnorm(model, images):
        raise RuntimeError("scoring failed")
    assert all(np.array_equal(a, b) for a, b in zip(_bn_values(model), bn_before,
                                                    strict=True))


def test_adabn_equals_batch_statistics_of_the_whole_slide() -> None:
    """Layer-by-layer estimation in inference mode gives what one training-mode pass over
    the slide as a single batch would use (AdaBN's definition), whatever the chunking."""
    model = build_model("cellnet-tiny", 32, augment=False)
    images = cells(37, seed=6)
    features = keras.Model(model.inputs, model.get_layer("gap").output)
    batch_mode = keras.ops.convert_to_numpy(features([images], training=True))

    for chunk in (8, 128):
        with adapted_batchnorm(model, images, chunk=chunk):
            adapted = keras.ops.convert_to_numpy(features([images], training=False))
        np.testing.assert_allclose(adapted, batch_mode, rtol=1e-3, atol=1e-3)
    # The trained statistics as a large prior: almost nothing moves.
    plain = keras.ops.convert_to_numpy(features([images], training=False))
    with adapted_batchnorm(model, images, prior=1e9):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(features([images], training=False)), plain, atol=1e-5)


def test_scoring_by_slide_with_adabn() -> None:
    model = build_model("cellnet-tiny", 32, augment=False)
    a, b = cells(9, seed=7), cells(21, seed=8) // 3
    images, slides = np.concatenate([a, b]), ["a"] * 9 + ["b"] * 21

    plain = predict_by_slide(model, images, slides)
    adapted = predict_by_slide(model, images, slides, adapt="bn", chunk=8)

    np.testing.assert_array_equal(plain, predict_probabilities(model, images))
    assert not np.allclose(plain, adapted)
    # A slide's scores depend on its own cells only.
    np.testing.assert_allclose(adapted[9:], predict_by_slide(model, b, ["b"] * 21,
                                                             adapt="bn", chunk=8), atol=1e-6)
    np.testing.assert_array_equal(predict_by_slide(model, images, slides), plain)  # restored
    no_bn = build_model("seed-baseline", 64, augment=False)
    with pytest.raises(ValueError, match="BatchNormalization"):
        predict_by_slide(no_bn, cells(2, size=64), ["a", "a"], adapt="bn")


# ----------------------------------------------------------------- benchmark variants


def _args(**extra: object) -> argparse.Namespace:
    base = {"archs": "cellnet", "override": None, "size": None, "slide_adapt": "none",
            "bn_prior": 0.0, "ensemble": 1, "tta": False, "threshold_rule": "fixed"}
    return argparse.Namespace(**{**base, **extra})


def test_variants_parse_share_training_and_refuse_mistakes(tmp_path: Path) -> None:
    from benchmarks.accuracy import VARIANT_PRESETS, parse_variants

    for preset in VARIANT_PRESETS:
        variants = parse_variants(preset, _args())
        assert variants[0].name == "cellnet" and variants[0].slide_adapt == "none"
    adapt = parse_variants("issue15-adapt", _args())
    assert len({v.recipe for v in adapt}) == 1  # one model per fold serves them all
    listing = tmp_path / "v.json"
    listing.write_text(json.dumps([{"name": "a"}, {"name": "b", "size": 80,
                                                   "override": {"epochs": 3}}]))
    a, b = parse_variants(str(listing), _args(override='{"epochs": 3}'))
    assert a.recipe == b.recipe  # default size and the same override, however written
    # The views are resolved from the command line (False: one view), so a kept fold
    # records the views it was scored at.
    assert (a.tta, b.tta) == (1, 1)
    assert [v.tta for v in parse_variants('[{"name": "a"}, {"name": "b", "tta": 1}]',
                                          _args(tta=8))] == [8, 1]
    for bad, message in (('[{"name": "a", "slide-adapt": "bn"}]', "unknown keys"),
                         ('[{"name": "a"}, {"name": "a"}]', "differ"),
                         ('[{"name": "a", "arch": "nope"}]', "unknown architecture"),
                         ('[{"name": "a", "slide_adapt": "hsv"}]', "slide_adapt"),
                         ('[{"name": "a", "threshold_rule": "f1"}]', "threshold_rule"),
                         ("[]", "non-empty")):
        with pytest.raises(ValueError, match=message):
            parse_variants(bad, _args())


def test_a_kept_fold_is_taken_only_at_the_views_it_was_scored_at(tmp_path: Path) -> None:
    from benchmarks.accuracy import (
        Scored,
        Variant,
        load_fold_state,
        save_fold_state,
    )
    from malaria.dataset.split import SlideSplit

    split = SlideSplit(train=["t1", "t2"], val=["v"], test=["x"])
    cells = Scored(np.array([1.0, 0.0]), np.array([0.9, 0.2], dtype=np.float32),
                   np.array(["x", "x"]), 0.5, np.array([1.0, 0.0]), np.array([0.8, 0.1]))
    eight = Variant("cellnet", "cellnet", tta=8)
    save_fold_state(tmp_path, 0, eight, split, {"tta": 8, "accuracy": 1.0}, cells)

    kept = load_fold_state(tmp_path, 0, eight, split)
    assert kept is not None and kept[0]["accuracy"] == 1.0
    assert kept[1].val_probabilities is not None and list(kept[1].val_labels) == [1.0, 0.0]
    assert load_fold_state(tmp_path, 0, Variant("cellnet", "cellnet", tta=1), split) is None

    assert load_fold_state(tmp_path, 0, Variant("cellnet", "cellnet", tta=8,
                                                threshold_rule="youden"), split) is None

    # A fold kept before views and rule were recorded (tta None, no rule) was scored at its
    # row's views and by Youden's J, the only rule then.
    meta = tmp_path / "fold0-cellnet.json"
    saved = json.loads(meta.read_text())
    saved["variant"]["tta"] = None
    del saved["variant"]["threshold_rule"]
    meta.write_text(json.dumps(saved))
    old = Variant("cellnet", "cellnet", tta=8, threshold_rule="youden")
    assert load_fold_state(tmp_path, 0, old, split) is not None
    assert load_fold_state(tmp_path, 0, eight, split) is None  # the default rule is "fixed"
    assert load_fold_state(tmp_path, 0, Variant("cellnet", "cellnet", tta=1,
                                                threshold_rule="youden"), split) is None


def test_paired_difference_on_the_same_cells() -> None:
    from benchmarks.accuracy import Scored, paired_difference

    def scored(probs: list[float], threshold: float) -> Scored:
        return Scored(np.array([1, 1, 0, 0, 1, 0], dtype=np.float32), np.array(probs),
                      np.array(["a", "a", "a", "b", "b", "b"]), threshold)

    base = [scored([0.9, 0.4, 0.6, 0.1, 0.8, 0.2], 0.5)]
    same = paired_difference(base, base, resamples=100)
    assert all(same[k]["estimate"] == 0 for k in ("accuracy", "auc",
                                                  "parasitemia_error_mean"))
    # The other variant gets slide a's two mistakes right: +2/6 accuracy, and slide a's
    # parasitemia error (1 of 3 cells) is gone: -100/3/2 points on average.
    better = paired_difference(base, [scored([0.9, 0.6, 0.4, 0.1, 0.8, 0.2], 0.5)],
                               resamples=200)
    assert better["accuracy"]["estimate"] == pytest.approx(2 / 6)
    assert better["parasitemia_error_mean"]["estimate"] == pytest.approx(0.0)
    assert better["accuracy"]["low"] <= better["accuracy"]["estimate"]
    with pytest.raises(ValueError, match="same cells"):
        paired_difference(base, [Scored(np.zeros(6), np.zeros(6), np.array(["x"] * 6), 0.5)])


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.accuracy import folder_loader, write_pack
    from malaria.dataset.records import records_from_folder
    from malaria_dev.synthetic import write_labelled_tree

    root = tmp_path_factory.mktemp("variants")
    write_labelled_tree(root / "cells", 120, slides=6, seed=9)
    path = root / "cells.npz"
    write_pack(path, records_from_folder(root / "cells"),
               folder_loader(root / "cells", root / "cache"), SIZE)
    return path


def test_cv_variants_end_to_end_resumed_and_ensembled_from_kept_models(
        pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import benchmarks.accuracy as bench

    variants = [{"name": "base", "arch": "cellnet-tiny"},
                {"name": "colour", "arch": "cellnet-tiny", "slide_adapt": "colour"},
                {"name": "bn", "arch": "cellnet-tiny", "slide_adapt": "bn", "bn_prior": 8},
                {"name": "pair", "arch": "cellnet-tiny", "ensemble": 2, "tta": 2}]
    trained: list[str] = []
    real = bench.train_candidate

    def counting(config, *args, **kwargs):  # type: ignore[no-untyped-def]
        trained.append(f"{config.arch}/{config.seed}")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(bench, "train_candidate", counting)
    out = tmp_path / "cv.json"
    command = ["--pack", str(pack), "--cv", "2", "--size", str(SIZE), "--minutes", "0.2",
               "--tta", "1", "--override", '{"epochs": 1, "mixed_precision": "float32"}',
               "--cv-variants", json.dumps(variants), "--cv-state", str(tmp_path / "state"),
               "--workdir", str(tmp_path / "work"), "--json", str(out)]

    assert bench.main(command) == 0

    # Two members of one recipe per fold serve all four variants.
    assert len(trained) == 4 and len(set(trained)) == 2
    report = json.loads(out.read_text())
    assert [v["name"] for v in report["meta"]["variants"]] == ["base", "colour", "bn", "pair"]
    for name in ("base", "colour", "bn", "pair"):
        result = report[name]
        assert result["cells"] == 120 and result["cv_folds"] == 2
        assert set(result["bootstrap"]) >= {"accuracy", "auc", "parasitemia_error_mean"}
        assert {p["slide"] for p in result["parasitemia"]["per_slide"]} == set(
            report["meta"]["folds"])
    assert "versus_first" not in report["base"]
    assert report["colour"]["versus_first"]["variant"] == "base"
    assert report["colour"]["folds"][0]["colour_reference"]["pixels"] > 0
    assert report["bn"]["folds"][0]["slide_adapt"] == "bn"
    assert len(report["pair"]["folds"][0]["ensemble"]) == 2
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| variant |") and table.count("\n") == 2 + 4
    assert table == report["meta"]["comparison_markdown"] + "\n"
    assert "| base |" in capsys.readouterr().out

    # The same command again takes every fold from the state folder: nothing is trained.
    trained.clear()
    again = tmp_path / "again.json"
    assert bench.main([*command[:-1], str(again)]) == 0
    assert trained == []
    repeat = json.loads(again.read_text())
    for name in ("base", "bn", "pair"):
        assert repeat[name]["accuracy"] == report[name]["accuracy"]
        assert repeat[name]["auc"] == report[name]["auc"]

    # A kept fold holds the validation scores that chose its threshold.
    with np.load(tmp_path / "state" / "fold0-pair.npz") as kept:
        assert len(kept["val_labels"]) == len(kept["val_probabilities"]) > 0

    # benchmarks.cv_ensemble, from the fold models the CV kept, gives the CV's own figures:
    # one member alone is "base", the two members averaged at 2 views are "pair".
    from benchmarks import cv_ensemble

    members = [f"member{i}={tmp_path}/work/cv2-fold{{fold}}/recipe0-member{i}/*/model.keras"
               for i in (0, 1)]
    for views, one, both in ((1, "base", None), (2, None, "pair")):
        kept_out = tmp_path / f"ensemble-{views}.json"
        assert cv_ensemble.main(["--pack", str(pack), "--cv", "2", "--views", str(views),
                                 "--member", members[0], "--member", members[1],
                                 "--ensemble", "member0+member1", "--json", str(kept_out)]) == 0
        results = json.loads(kept_out.read_text())["results"]
        for name, variant in (("member0", one), ("member0+member1", both)):
            if variant is None:
                continue
            metrics = results[name]["metrics"]
            assert metrics["accuracy"] == pytest.approx(report[variant]["accuracy"], abs=1e-9)
            assert metrics["roc_auc"] == pytest.approx(report[variant]["auc"], abs=1e-6)
        assert results["member0+member1"]["versus_first"]["variant"] == "member0"


def test_cv_variants_need_cv(pack: Path) -> None:
    from benchmarks.accuracy import main

    with pytest.raises(SystemExit) as refused:
        main(["--pack", str(pack), "--cv-variants", "issue15-adapt"])
    assert refused.value.code == 2
    with pytest.raises(SystemExit) as refused:
        main(["--pack", str(pack), "--cv", "2", "--cv-variants", '[{"name": 1, "x": 2}]'])
    assert refused.value.code == 2


@pytest.mark.parametrize("arguments", [
    ["--member", "no-glob"],
    ["--member", "a+b=x/{fold}"],
    ["--member", "a=x/{fold}", "--member", "a=y/{fold}"],
    ["--member", "a=x/{fold}", "--ensemble", "a"],
    ["--member", "a=x/{fold}", "--ensemble", "a+c"],
    ["--member", "a=x/{fold}", "--rules", "youden,nope"],
    ["--member", "a=x/{fold}", "--rules", "1.5"],
    ["--member", "a=x/{fold}", "--rules", "youden,youden"],
])
def test_kept_model_ensembles_refuse_malformed_members(pack: Path,
                                                       arguments: list[str]) -> None:
    from benchmarks.cv_ensemble import main

    with pytest.raises(SystemExit) as refused:
        main(["--pack", str(pack), *arguments])
    assert refused.value.code == 2


def test_the_parasitemia_rule_fits_each_slides_share() -> None:
    from benchmarks.cv_ensemble import parasitemia_threshold, threshold_by

    labels = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=np.float32)
    probs = np.array([0.9, 0.6, 0.2, 0.1, 0.95, 0.7, 0.65, 0.1])
    slides = np.array(["a"] * 4 + ["b"] * 4)
    # a's 25% needs a threshold in (0.6, 0.9], b's 50% one in (0.65, 0.7]: the midpoint.
    assert parasitemia_threshold(labels, probs, slides) == pytest.approx(0.675)
    assert threshold_by("0.3", labels, probs, slides) == 0.3
    assert 0.0 < threshold_by("youden", labels, probs, slides) < 1.0
