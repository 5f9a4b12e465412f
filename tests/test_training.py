"""Audit, split, preprocessing parity, and a tiny train -> export -> LiteRT run on made-up images."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TrainedRun, write_jpeg
from PIL import Image
from planted_data import lesion_image

from dermwatch.cli import cli
from dermwatch.training.audit import audit


def rows_by_name(rows):
    grouped = defaultdict(list)
    for row in rows:
        grouped[Path(row.path).name].append(row)
    return grouped


def test_audit_finds_and_resolves_every_planted_defect(planted: dict[str, Path]) -> None:
    result = audit([planted["root"]], planted["truth"])
    rows = rows_by_name(result.rows)
    text = "\n".join(result.findings)

    assert "filed under both actinic keratosis and nevus: 1" in text
    assert {r.resolved_label for r in rows["ISIC_0100001.jpg"]} == {"actinic keratosis"}
    assert sum(bool(r.dropped) for r in rows["ISIC_0100001.jpg"]) == 1  # one copy kept

    assert "filed under both melanoma and seborrheic keratosis: 2" in text
    assert all("does not settle" in r.dropped for r in rows["ISIC_0100002.jpg"])

    assert "byte-identical pairs within one class: 1" in text
    (copy,) = [r for name, rs in rows.items() if "(1)" in name for r in rs]
    assert copy.dropped.startswith("byte-identical copy of")

    siblings = rows["ISIC_0200001.jpg"] + rows["ISIC_0200002.jpg"] + rows["ISIC_0200003.jpg"]
    assert {r.lesion_group for r in siblings} == {"HAM_0000042"}
    assert rows["ISIC_0200003.jpg"][0].split == "test_leaky"
    assert "lesions photographed more than once (ground-truth lesion ids): 1 lesions, 3 distinct images" in text

    (test_twin,) = [r for r in rows["ISIC_0300000.jpg"] if r.origin == "test"]
    assert test_twin.split == "test_leaky" and test_twin.note.startswith("same bytes as")
    assert "Test files that also sit in the training folders under another label: 1" in text

    assert rows["ISIC_0400000.jpg"][0].lesion_group == rows["ISIC_0400001.jpg"][0].lesion_group
    assert "near-identical images with different bytes" in text and "ISIC_0400000.jpg" in text


def test_scan_reads_every_format_the_service_reads_and_says_what_it_leaves_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dermwatch.training.scan import scan_roots

    root = tmp_path / "ph2"
    jpeg = lesion_image(root / "nevus" / "IMD003.jpg", "nevus", 1)
    Image.open(jpeg).save(root / "nevus" / "IMD004.bmp")  # PH2 as it is published
    shutil.copy(jpeg, root / "nevus" / "IMD005.jfif")  # a JPEG as Windows browsers save it
    (root / "melanoma").mkdir()
    Image.open(jpeg).save(root / "melanoma" / "IMD058.tif", compression="tiff_lzw")
    (root / "melanoma" / "IMD058 notes.txt").write_text("biopsy 2019")
    (root / "melanoma" / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level("WARNING", logger="dermwatch.training.scan"):
        found = scan_roots([root])
    assert sorted(f.path.name for f in found) == ["IMD003.jpg", "IMD004.bmp", "IMD005.jfif", "IMD058.tif"]
    assert "1 entry left out" in caplog.text and "IMD058 notes.txt" in caplog.text
    assert ".DS_Store" not in caplog.text and "nevus" not in caplog.text


def test_split_keeps_lesion_groups_together_and_is_repeatable(planted: dict[str, Path]) -> None:
    first = audit([planted["root"]], planted["truth"], seed=3)
    second = audit([planted["root"]], planted["truth"], seed=3)
    assert [r.split for r in first.rows] == [r.split for r in second.rows]
    splits_of_group = defaultdict(set)
    for row in first.rows:
        if row.split in {"train", "val"}:
            splits_of_group[row.lesion_group].add(row.split)
    assert all(len(s) == 1 for s in splits_of_group.values())
    assert {r.split for r in first.rows if r.origin == "test"} <= {"test", "test_leaky"}
    val_labels = {r.resolved_label for r in first.rows if r.split == "val"}
    assert "melanoma" in val_labels and len(val_labels) >= 8  # stratified: nearly every class


def test_training_and_service_preprocess_identically(tmp_path: Path, settings, monkeypatch) -> None:
    """One full-size photo through the training loader and through the service pipeline."""
    from dermwatch.pipeline.classifier import Classifier
    from dermwatch.pipeline.process import open_processor
    from dermwatch.training.audit import ManifestRow
    from dermwatch.training.data import load_arrays

    photo = write_jpeg(tmp_path / "full.jpg", seed=5, size=(1024, 768))
    row = ManifestRow(path=str(photo), root="x", origin="train", image_id="full", sha256="", phash="",
                      folder_label="nevus", resolved_label="nevus", label_source="folder", lesion_group="g",
                      split="train", dropped="", note="")
    processor = open_processor(settings)
    trained_on, _ = load_arrays([row], processor.lanes.input_size)
    claimed = processor.claim(photo)

    seen_by_model = []
    real_predict = Classifier.predict

    def recording_predict(self: Classifier, pixels: np.ndarray) -> np.ndarray:
        seen_by_model.append(pixels.copy())
        return real_predict(self, pixels)

    monkeypatch.setattr(Classifier, "predict", recording_predict)
    assert processor.process([claimed])[0].status == "classified"
    np.testing.assert_array_equal(seen_by_model[0][0], trained_on[0])


def test_tiny_train_export_and_litert_load(planted: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    runner = CliRunner()
    trained = runner.invoke(cli, ["train", "--data", str(planted["root"]), "--ground-truth", str(planted["truth"]),
                                  "--out", str(run_dir), "--epochs", "2", "--input-size", "32",
                                  "--backbone", "dermnet", "--width", "4",
                                  "--batch-size", "16", "--epoch-images", "0", "--balance", "weights"],
                             catch_exceptions=False)  # every image each epoch, the loss weighted
    assert trained.exit_code == 0, trained.output
    record = json.loads((run_dir / "training.json").read_text())
    assert 0 < record["melanoma_threshold"] < 1 and record["temperature"] > 0
    assert len(record["history"]) == 2 and record["best_epoch"] in (1, 2)
    assert (run_dir / "manifest.csv").is_file() and (run_dir / "audit.txt").is_file()

    clinic = tmp_path / "clinic"  # another clinic's labelled images, never trained on
    for n in range(4):
        write_jpeg(clinic / ("melanoma", "nevus")[n % 2] / f"case{n}.jpg", seed=950 + n)
    from dermwatch.modelcard import shipped_model_path
    from dermwatch.training import export

    shipped_before = shipped_model_path().read_bytes()
    with monkeypatch.context() as patched:
        patched.setattr(export, "MAX_SHIPPED_BYTES", 1)  # no file fits: --ship must refuse, shipping nothing
        exported = runner.invoke(cli, ["export", str(run_dir), "--version", "t1", "--external", str(clinic),
                                       "--ship"])
    assert exported.exit_code == 1 and "nothing shipped: float32 (" in exported.output, exported.output
    assert shipped_model_path().read_bytes() == shipped_before
    assert "external:clinic: 4 images" in exported.output  # every file was still exported, checked and scored
    from dermwatch.pipeline.classifier import load_classifier

    for quantization in ("float32", "dynamic", "int8"):
        path = run_dir / "export" / f"dermwatch-{quantization}.tflite"
        classifier = load_classifier(path, threads=1)
        card = classifier.card.document
        assert card["quantization"] == quantization and card["version"] == f"t1-{quantization}"
        assert set(card["evaluation"]["sets"]) == {"validation", "test_published", "test_leak_free",
                                                   "external:clinic"}
        sets = card["evaluation"]["sets"]
        assert sets["test_leak_free"]["images"] < sets["test_published"]["images"]
        probabilities = classifier.predict(np.zeros((3, 32, 32, 3), dtype=np.uint8))
        assert probabilities.shape == (3, 9)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=0.02)
        assert path.with_suffix(".html").read_text().count("data:image/png;base64,") == 3
    float_card = json.loads((run_dir / "export" / "dermwatch-float32.json").read_text())
    assert float_card["export_check"]["top1_agreement"] == 1.0
    assert float_card["export_check"]["max_probability_difference"] < 1e-4
    assert float_card["training"]["threshold_rule"].endswith("at least 50 (the worst of them decides)")

    from dermwatch.modelcard import write_card
    from dermwatch.training.export import NothingToShip, choose_shipped

    paths = [run_dir / "export" / f"dermwatch-{quantization}.tflite" for quantization in ("float32", "int8")]
    int8_card = json.loads((run_dir / "export" / "dermwatch-int8.json").read_text())
    close = {**float_card["evaluation"]["sets"]["validation"]}
    close["melanoma_roc_auc"] -= 0.009
    close["melanoma_specificity"] -= 0.019
    write_card(paths[1], {**int8_card, "evaluation": {"sets": {"validation": close}}})
    assert choose_shipped(paths) == paths[1]  # rounding cost within its bars: the small file ships
    no_nevi = {**close, "melanoma_vs_nevus_auc": float("nan")}
    write_card(paths[1], {**int8_card, "evaluation": {"sets": {"validation": no_nevi}}})
    assert choose_shipped(paths) == paths[1]  # a figure the set cannot give (no nevi) decides nothing
    close["accuracy"] -= 0.02
    write_card(paths[1], {**int8_card, "evaluation": {"sets": {"validation": close}}})
    assert choose_shipped(paths) == paths[0]
    dynamic = run_dir / "export" / "dermwatch-dynamic.tflite"  # int8 weights, float activations
    assert choose_shipped([*paths, dynamic]) == dynamic  # within its bars
    dynamic_card = json.loads(dynamic.with_suffix(".json").read_text())
    fallen = {**close, "accuracy": close["accuracy"] + 0.02,
              "melanoma_specificity": close["melanoma_specificity"] - 0.002}
    write_card(dynamic, {**dynamic_card, "evaluation": {"sets": {"validation": fallen}}})
    assert choose_shipped([*paths, dynamic]) == paths[0]  # the operating point fell over 2 points
    write_card(paths[1], {**int8_card, "evaluation": {"sets": {"validation": no_nevi}}})
    assert choose_shipped([*paths, dynamic]) == paths[1]  # then int8, where it is within its bars
    write_card(dynamic, dynamic_card)
    assert choose_shipped([*paths, dynamic]) == dynamic  # but dynamic first, where both are
    write_card(dynamic, {**dynamic_card, "evaluation": {"sets": {"validation": fallen}}})
    write_card(paths[1], {**int8_card, "evaluation": {"sets": {"validation": close}}})
    with pytest.raises(NothingToShip, match=r"float32 \(.* bytes\) is larger .* melanoma_specificity \(\+0\.021\)"):
        choose_shipped([*paths, dynamic], max_bytes=paths[0].stat().st_size - 1)  # the service could not hold it
    write_card(dynamic, dynamic_card)  # within its bars, but too large: the refusal says so
    with pytest.raises(NothingToShip, match=r"dynamic kept float32's figures but is [\d,]+ bytes"):
        choose_shipped([*paths, dynamic], max_bytes=1)


@pytest.mark.xdist_group("two_seeds")  # one worker trains them once
def test_a_seed_ensemble_averages_its_members_and_exports_like_a_run(two_seeds: list[TrainedRun],
                                                                     tmp_path: Path) -> None:
    """Two seeds on one split average into one model that exports like a run. (That one seed
    trains one model is checked by test_a_stopped_run_resumes_from_its_last_epoch.)"""
    import keras

    runs = [run.run_dir for run in two_seeds]
    ensemble_dir = tmp_path / "ensemble"
    made = CliRunner().invoke(cli, ["ensemble", *map(str, runs), "--out", str(ensemble_dir)], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    members = [keras.models.load_model(run_dir / "model.keras").predict(pixels, verbose=0) for run_dir in runs]
    averaged = keras.models.load_model(ensemble_dir / "model.keras").predict(pixels, verbose=0)
    assert not np.allclose(members[0], members[1], atol=1e-3)
    np.testing.assert_allclose(averaged, (members[0] + members[1]) / 2, atol=1e-5)
    exported = CliRunner().invoke(cli, ["export", str(ensemble_dir)], catch_exceptions=False)
    assert exported.exit_code == 0 and "chosen for shipping: dermwatch-" in exported.output, exported.output
    card = json.loads((ensemble_dir / "export" / "dermwatch-float32.json").read_text())
    assert [m["seed"] for m in card["training"]["ensemble_members"]] == [5, 6]
    page = " ".join((ensemble_dir / "export" / "dermwatch-float32.html").read_text().split())
    assert "the mean of 2 networks' logits" in page and "seed 5 (<code>" in page and "seed 6 (<code>" in page
    assert card["version"].startswith("dermnet32x2-") and card["export_check"]["top1_agreement"] == 1.0
    # Members on another split, or fed another input, are refused with the reason.
    for key, value in (("data_fingerprint", "0" * 64), ("crop", "lesion")):
        stranger = tmp_path / f"stranger-{key}"
        shutil.copytree(runs[1], stranger)
        record = json.loads((stranger / "training.json").read_text())
        (record if key == "data_fingerprint" else record["options"])[key] = value
        (stranger / "training.json").write_text(json.dumps(record))
        refused = CliRunner().invoke(cli, ["ensemble", str(runs[0]), str(stranger), "--out", str(tmp_path / "x")])
        assert refused.exit_code == 1
        assert ("another split" if key == "data_fingerprint" else "one input cannot feed both") in refused.output


def test_logit_adjustment_is_folded_into_the_last_layer() -> None:
    import keras

    from dermwatch.training.data import class_priors
    from dermwatch.training.model import build_model
    from dermwatch.training.train import add_to_logit_bias

    labels = np.array([4] * 6 + [3] * 3 + [0])  # six nevi, three melanomas, one actinic keratosis
    priors = class_priors(labels)
    assert priors[4] == 6 / 16 and priors[8] == 1 / 16  # a class with no example counts as one
    keras.utils.set_random_seed(0)
    model = build_model("dermnet", 32, width=4)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    before = model.predict(pixels, verbose=0)
    add_to_logit_bias(model, -np.log(priors))
    after = model.predict(pixels, verbose=0)
    np.testing.assert_allclose(after - before, np.broadcast_to(-np.log(priors), before.shape), atol=1e-4)
    # The commonest class gains least: the adjustment undoes the training prior.
    assert np.argmin(after - before, axis=1).tolist() == [4, 4]


def test_logit_adjustment_ema_colour_and_crop_modes_reach_the_card(planted: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data", str(planted["root"]), "--ground-truth", str(planted["truth"]),
                                      "--out", str(run_dir), "--epochs", "1", "--input-size", "32",
                                      "--backbone", "dermnet", "--width", "4",
                                      "--batch-size", "16", "--balance", "logit-adjust", "--colour", "shades-of-grey",
                                      "--crop", "lesion", "--ema", "--epoch-images", "40", "--seed", "3",
                                      "--split-seed", "0", "--colour-jitter", "strong", "--zoom", "mild"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    options = json.loads((run_dir / "training.json").read_text())["options"]
    assert options["balance"] == "logit-adjust" and options["colour"] == "shades-of-grey" and options["ema"]
    assert options["crop"] == "lesion" and options["epoch_images"] == 40 and options["colour_jitter"] == "strong"
    assert options["zoom"] == "mild"
    # A drawn epoch is 40 // 16 = 2 steps, however many training images there are.
    import keras

    checkpoint = run_dir / "checkpoint" / "epoch-001.keras"
    assert int(keras.models.load_model(checkpoint).optimizer.iterations) == 2
    exported = CliRunner().invoke(cli, ["export", str(run_dir), "--version", "t2"], catch_exceptions=False)
    assert exported.exit_code == 0, exported.output
    card = json.loads((run_dir / "export" / "dermwatch-float32.json").read_text())
    assert card["input"]["colour"] == "shades-of-grey" and card["input"]["crop"] == "lesion"
    # Keras was given cropped, normalised pixels, LiteRT raw ones: they agree only if the
    # classifier applies the card's crop and colour modes exactly as training did.
    assert card["export_check"]["top1_agreement"] == 1.0
    assert card["export_check"]["max_probability_difference"] < 1e-4
    # Trained with seed 3 on split 0: the manifest holds split 0, and `evaluate` draws it again.
    from dermwatch.training.export import read_manifest

    split = {r.path: r.split for r in read_manifest(run_dir / "manifest.csv")}
    assert split == {r.path: r.split for r in audit([planted["root"]], planted["truth"], seed=0).rows}
    assert split != {r.path: r.split for r in audit([planted["root"]], planted["truth"], seed=3).rows}
    scored = CliRunner().invoke(cli, ["evaluate", str(run_dir / "export" / "dermwatch-float32.tflite"),
                                      "--data", str(planted["root"]), "--ground-truth", str(planted["truth"])])
    assert scored.exit_code == 0, scored.output
    refused = CliRunner().invoke(cli, ["train", "--data", str(planted["root"]), "--out", str(tmp_path / "x"),
                                       "--balance", "oversample"])
    assert refused.exit_code == 2 and "oversample" in refused.output


def test_class_and_source_weights_balance_each_class_across_roots() -> None:
    from dermwatch.training.data import class_and_source_weights, class_weights

    # Melanomas mostly from one root, nevi mostly from the other: the root predicts the class.
    labels = np.array([3] * 30 + [3] * 6 + [4] * 20 + [4] * 80 + [0] * 10)
    roots = ["isic9"] * 30 + ["supplement"] * 6 + ["isic9"] * 20 + ["supplement"] * 80 + ["isic9"] * 10
    weights = class_and_source_weights(labels, roots)
    assert weights.mean() == pytest.approx(1.0)
    class_totals = [weights[labels == c].sum() for c in (0, 3, 4)]
    assert class_totals == pytest.approx([class_totals[0]] * 3)
    root_is = np.array(roots)
    for c in (3, 4):
        by_root = [weights[(labels == c) & (root_is == r)].sum() for r in ("isic9", "supplement")]
        assert by_root[0] == pytest.approx(by_root[1])
    # With one root these are the class weights.
    single = class_and_source_weights(labels, ["isic9"] * len(labels))
    expected = class_weights(labels)
    np.testing.assert_allclose(single, [expected[c] for c in labels], rtol=1e-6)


def test_sample_weights_stay_with_their_images_through_shuffle_and_augmentation() -> None:
    from dermwatch.training.tf_batches import training_batches

    labels = np.arange(40) % 9
    images = np.zeros((40, 16, 16, 3), dtype=np.uint8)
    weights = (labels * 10 + 1).astype(np.float32)
    seen = 0
    for batch_images, batch_labels, batch_weights in training_batches(images, labels, 8, seed=3,
                                                                      sample_weights=weights):
        assert batch_images.shape[1:] == (16, 16, 3)
        np.testing.assert_array_equal(batch_weights.numpy(), batch_labels.numpy() * 10 + 1)
        seen += len(batch_labels)
    assert seen == 40


def test_epoch_draws_balance_classes_and_roots_like_the_weights() -> None:
    from dermwatch.training.data import balance_weights, epoch_draws

    # 90 % of melanomas and 10 % of nevi from one root: drawn, each (class, root) cell gets
    # the same share of the epoch that the class-and-source weights give it.
    labels = np.array([3] * 90 + [3] * 10 + [4] * 10 + [4] * 90)
    roots = ["isic9"] * 90 + ["ham10000"] * 10 + ["isic9"] * 10 + ["ham10000"] * 90
    draws = epoch_draws(balance_weights(labels, roots, "class-and-source"), epochs=3, epoch_images=4000, seed=1)
    assert draws.shape == (3, 4000)
    cells = Counter(zip(labels[draws[0]].tolist(), np.array(roots)[draws[0]].tolist(), strict=True))
    assert all(abs(count / 4000 - 0.25) < 0.03 for count in cells.values()) and len(cells) == 4
    assert not np.array_equal(draws[0], draws[1])  # each epoch draws anew
    np.testing.assert_array_equal(draws, epoch_draws(balance_weights(labels, roots, "class-and-source"), 3, 4000, 1))
    # Class weights balance the classes and leave the roots as they are; none draws evenly.
    by_class = epoch_draws(balance_weights(labels, roots, "weights"), 1, 4000, 2)[0]
    assert abs((labels[by_class] == 3).mean() - 0.5) < 0.03
    assert abs((np.array(roots)[by_class[labels[by_class] == 3]] == "isic9").mean() - 0.9) < 0.03
    np.testing.assert_array_equal(balance_weights(labels, roots, "none"), np.ones(len(labels)))


def test_drawn_batches_follow_the_draws() -> None:
    from dermwatch.training.tf_batches import training_batches

    labels = np.arange(12) % 9
    images = np.broadcast_to(np.arange(12, dtype=np.uint8)[:, None, None, None], (12, 8, 8, 3)).copy()
    draws = np.array([[5, 5, 0, 11], [3, 7, 7, 1]])
    batches = list(training_batches(images, labels, 4, seed=0, augment=False, draws=draws))
    assert len(batches) == 2
    seen = np.concatenate([batch_images.numpy()[:, 0, 0, 0] for batch_images, _ in batches])
    np.testing.assert_array_equal(seen, draws.ravel())
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in batches]), labels[draws.ravel()])
    assert sum(len(y) for _, y in training_batches(images, labels, 4, seed=0, draws=draws)) == 8  # augmented too
    with pytest.raises(ValueError, match="not both"):
        training_batches(images, labels, 4, seed=0, draws=draws, sample_weights=np.ones(12, np.float32))


def test_strong_colour_jitter_moves_colours_further_than_mild() -> None:
    from dermwatch.training.tf_batches import training_batches

    images = np.broadcast_to(np.array([150, 110, 100], np.uint8), (64, 8, 8, 3)).copy()  # one skin tone
    labels = np.zeros(64, np.int32)

    def spread(jitter: str) -> float:
        """How far apart the augmented copies' red-to-green ratios lie."""
        batch = next(iter(training_batches(images, labels, 64, seed=0, colour_jitter=jitter)))[0].numpy()
        means = batch.reshape(64, -1, 3).mean(axis=1)
        return float(np.std(means[:, 0] / np.maximum(means[:, 1], 1.0)))

    assert spread("strong") > 2 * spread("mild") > 0


def test_strong_zoom_shows_lesions_larger_than_mild() -> None:
    from dermwatch.training.data import geometric_augmentation

    side = 64
    rows, columns = np.mgrid[:side, :side]
    disc = (np.hypot(rows - side / 2, columns - side / 2) < side / 6).astype(np.float32)  # a small central lesion
    images = np.broadcast_to(disc[None, :, :, None], (256, side, side, 3)).copy()

    def lesion_share(zoom: str) -> float:
        augmented = np.asarray(geometric_augmentation(seed=0, zoom=zoom)(images, training=True))
        return float((augmented[..., 0] > 0.5).mean())

    mild, strong = lesion_share("mild"), lesion_share("strong")
    assert strong > 1.5 * mild and abs(mild - disc.mean()) < 0.3 * disc.mean()


def test_portable_batches_follow_the_draws_shuffle_each_epoch_and_jitter_like_tf_data() -> None:
    from dermwatch.training.portable_batches import PortableBatches

    labels = np.arange(12) % 9
    images = np.broadcast_to(np.arange(12, dtype=np.uint8)[:, None, None, None], (12, 8, 8, 3)).copy()
    draws = np.array([[5, 5, 0, 11], [3, 7, 7, 1]])
    drawn = PortableBatches(images, labels, 4, seed=0, augment=False, draws=draws)
    first = drawn[0]
    drawn.on_epoch_end()
    second = drawn[0]
    assert len(drawn) == 1
    np.testing.assert_array_equal(np.concatenate([first[0], second[0]])[:, 0, 0, 0], draws.ravel())
    np.testing.assert_array_equal(np.concatenate([first[1], second[1]]), labels[draws.ravel()])
    with pytest.raises(ValueError, match="not both"):
        PortableBatches(images, labels, 4, seed=0, draws=draws, sample_weights=np.ones(12, np.float32))

    shuffled = PortableBatches(images, labels, 5, seed=0, augment=False, sample_weights=np.arange(12.0))
    epochs = []
    for _ in range(2):
        batches = [shuffled[i] for i in range(len(shuffled))]
        assert [len(batch[0]) for batch in batches] == [5, 5, 2]
        order = np.concatenate([batch[0][:, 0, 0, 0] for batch in batches])
        np.testing.assert_array_equal(np.concatenate([batch[2] for batch in batches]), order)  # weights travel
        epochs.append(order)
        shuffled.on_epoch_end()
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12)) and list(epochs[0]) != list(epochs[1])

    skin = np.broadcast_to(np.array([150, 110, 100], np.uint8), (64, 8, 8, 3)).copy()

    def spread(jitter: str) -> float:
        batch = PortableBatches(skin, np.zeros(64, np.int32), 64, seed=0, colour_jitter=jitter)[0][0]
        assert batch.shape == (64, 8, 8, 3) and 0 <= batch.min() and batch.max() <= 255
        means = batch.reshape(64, -1, 3).mean(axis=1)
        return float(np.std(means[:, 0] / np.maximum(means[:, 1], 1.0)))

    assert spread("strong") > 2 * spread("mild") > 0
    again = PortableBatches(skin, np.zeros(64, np.int32), 64, seed=0)
    np.testing.assert_array_equal(again[0][0], PortableBatches(skin, np.zeros(64, np.int32), 64, seed=0)[0][0])


def test_training_runs_on_jax_and_its_model_exports_with_tensorflow(planted: dict[str, Path], tmp_path: Path) -> None:
    """A GPU machine has JAX and no TensorFlow: training must run there (the NumPy pipeline),
    and TensorFlow must then convert what it saved."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "on-jax"
    trained = subprocess.run(
        [sys.executable, "-m", "dermwatch", "train", "--data", str(planted["root"]), "--ground-truth",
         str(planted["truth"]), "--out", str(run_dir), "--epochs", "2", "--input-size", "32",
         "--backbone", "dermnet", "--width", "4", "--batch-size", "16", "--epoch-images", "64"],
        env={**os.environ, "KERAS_BACKEND": "jax"}, capture_output=True, text=True, timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((run_dir / "training.json").read_text())
    assert record["keras_backend"] == "jax" and len(record["history"]) == 2
    exported = CliRunner().invoke(cli, ["export", str(run_dir), "--version", "jax"], catch_exceptions=False)
    assert exported.exit_code == 0, exported.output
    card = json.loads((run_dir / "export" / "dermwatch-float32.json").read_text())
    assert card["export_check"]["top1_agreement"] == 1.0 and card["training"]["options"]["epoch_images"] == 64


def test_card_names_its_intended_use_and_its_worst_source(tmp_path: Path) -> None:
    from dermwatch.modelcard import load_card, shipped_model_path
    from dermwatch.training.card_html import render_card_html

    card = load_card(shipped_model_path()).document
    base = card["evaluation"]["sets"]["validation"]
    sets = {"validation": base}
    for name, auc in (("validation:isic9", 0.62), ("validation:supplement", 0.41), ("external:derm7pt", 0.55)):
        sets[name] = {**base, "melanoma_vs_nevus_auc": auc, "nevus_flag_rate": 0.9, "intervals": {}}
    html = render_card_html({**card, "evaluation": {"sets": sets}}, tmp_path / "card.html").read_text()
    text = " ".join(html.split())
    assert "Intended use" in text and "it does not diagnose" in text
    assert "It may have learned cameras, not lesions." in text
    assert "worst on Validation, only images from supplement/: AUC 0.410" in text
    assert "At derm7pt, a clinic it never saw: the alert finds" in text and "flags 0.900 of nevi" in text


def test_the_default_recipe_trains_the_shipped_model() -> None:
    """README's promise: the shipped model averages `dermwatch train --seed 0 --split-seed 0` and
    `--seed 1 --split-seed 0`, all else default, from the ImageNet weights the card names."""
    from dataclasses import asdict

    from dermwatch.modelcard import load_card, shipped_model_path
    from dermwatch.training.efficientnet_lite import IMAGENET_WEIGHTS
    from dermwatch.training.options import TrainOptions

    training = load_card(shipped_model_path()).document["training"]
    assert [member["seed"] for member in training["ensemble_members"]] == [0, 1]
    assert training["options"] == asdict(TrainOptions(seed=0, split_seed=0))  # the first member's
    assert training["initial_weights"] == asdict(IMAGENET_WEIGHTS)


def test_card_shows_each_recipe_per_source_over_its_seeds(tmp_path: Path) -> None:
    import json

    from dermwatch.modelcard import load_card, shipped_model_path
    from dermwatch.training.card_html import render_card_html
    from dermwatch.training.seed_table import seed_rows

    card = load_card(shipped_model_path()).document
    base = card["evaluation"]["sets"]["validation"]

    def seed_card(isic9: float, derm7pt: float) -> dict:
        sets = {"validation": base, "validation:isic9": {**base, "melanoma_vs_nevus_auc": isic9},
                "external:derm7pt": {**base, "melanoma_vs_nevus_auc": derm7pt, "balanced_accuracy": None}}
        return {"evaluation": {"sets": sets}}

    rows = seed_rows("base", [seed_card(0.50, 0.70), seed_card(0.40, 0.60), seed_card(0.45, 0.62)])
    assert [row["source"] for row in rows] == ["validation:isic9", "external:derm7pt"]  # worst first
    assert rows[0]["melanoma_vs_nevus_auc"] == pytest.approx((0.45, 0.40, 0.50))
    assert rows[1]["balanced_accuracy"] is None and rows[0]["seeds"] == 3
    stored = json.loads(json.dumps({**card, "seed_table": rows}))  # as the card file holds it
    text = " ".join(render_card_html(stored, tmp_path / "card.html").read_text().split())
    assert "Recipes over seeds, per source" in text
    assert "<td>base</td><td>validation:isic9</td><td>3</td>" in text
    assert "<td>0.450 (0.400–0.500)</td>" in text and "<td>0.640 (0.600–0.700)</td>" in text
    assert "<td>n/a</td>" in text


def test_a_recipe_measured_again_replaces_only_its_own_rows_in_the_card() -> None:
    from dermwatch.training.seed_table import merge_rows

    def rows(recipe: str, *sources: str) -> list[dict]:
        return [{"recipe": recipe, "source": source} for source in sources]

    stored = rows("shipped", "a", "b") + rows("screened", "a", "b") + rows("previous", "a")
    merged = merge_rows(stored, rows("screened", "b", "a", "c") + rows("new", "a"))
    assert merged == (rows("shipped", "a", "b") + rows("screened", "b", "a", "c") + rows("previous", "a")
                      + rows("new", "a"))
    assert merge_rows([], rows("new", "a")) == rows("new", "a")


def test_shipping_keeps_the_recipe_table_the_choice_was_made_on(tiny_model: Path, tmp_path: Path) -> None:
    from dermwatch.modelcard import card_path, load_card, write_card
    from dermwatch.training.export import ship
    from dermwatch.training.seed_table import SEED_METRICS

    table = [{"recipe": "previous", "source": "external:derm7pt", "seeds": 2, "images": 486,
              **{key: [0.8, 0.7, 0.9] for key, _ in SEED_METRICS}}]
    shipped = ship(tiny_model, tmp_path / "models")
    assert "seed_table" not in load_card(shipped).document
    write_card(shipped, {**load_card(shipped).document, "seed_table": table})

    shipped = ship(tiny_model, tmp_path / "models")  # the next model replaces it: the table stays
    assert load_card(shipped).document["seed_table"] == table
    assert "Recipes over seeds" in shipped.with_suffix(".html").read_text()

    own = tmp_path / "own" / "model.tflite"  # a model whose card has a table of its own keeps that one
    own.parent.mkdir()
    shutil.copy(tiny_model, own)
    write_card(own, {**json.loads(card_path(tiny_model).read_text()), "seed_table": []})
    assert load_card(ship(own, tmp_path / "models")).document["seed_table"] == []


def test_melanoma_vs_nevus_auc_ignores_the_easy_negatives() -> None:
    from dermwatch.training.metrics import summarize

    # Melanomas score above every dermatofibroma but below every nevus.
    y = np.array([3, 3, 4, 4, 2, 2, 2, 2])
    p_melanoma = np.array([0.5, 0.5, 0.6, 0.6, 0.1, 0.1, 0.1, 0.1])
    probabilities = np.zeros((8, 9))
    probabilities[:, 3] = p_melanoma
    probabilities[:, 0] = 1 - p_melanoma
    result = summarize(probabilities, y, threshold=0.5)
    assert result["melanoma_roc_auc"] == pytest.approx(4 / 6)
    assert result["melanoma_vs_nevus_auc"] == 0.0


def test_card_figures_carry_bootstrap_intervals_and_say_n_a_for_a_missing_class() -> None:
    from dermwatch.training.metrics import figure, summarize

    rng = np.random.default_rng(0)
    y = np.array([3] * 40 + [4] * 60 + [0] * 20)  # melanoma, nevus, actinic keratosis
    probabilities = rng.dirichlet(np.ones(9), len(y))
    probabilities[y == 3, 3] += 0.3  # melanomas score somewhat higher
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    result = summarize(probabilities, y, threshold=0.2)
    for name, (low, high) in result["intervals"].items():
        assert low <= result[name] <= high, name
    low, high = result["intervals"]["melanoma_vs_nevus_auc"]
    assert 0.05 < high - low < 0.5  # 100 melanocytic images: wide, but not everything
    assert figure(result, "melanoma_roc_auc").count("[") == 1

    no_nevi = summarize(probabilities[y != 4], y[y != 4], threshold=0.2)
    assert no_nevi["intervals"]["nevus_flag_rate"] is None and figure(no_nevi, "nevus_flag_rate") == "n/a"
    assert figure(no_nevi, "melanoma_vs_nevus_auc") == "n/a"


def test_the_shipped_threshold_lets_the_worst_root_decide() -> None:
    from dermwatch.training.metrics import melanoma_threshold, worst_root_threshold

    # Root "ham": its ten melanomas score low (0.05..0.50); root "old": high (0.55..1.0).
    scores = np.concatenate([np.linspace(0.05, 0.5, 10), np.linspace(0.55, 1.0, 10), [0.3, 0.2]])
    y = np.array([3] * 20 + [4, 4])
    roots = ["ham"] * 10 + ["old"] * 10 + ["ham", "old"]
    probabilities = np.zeros((22, 9))
    probabilities[:, 3], probabilities[:, 4] = scores, 1 - scores
    pooled = melanoma_threshold(probabilities, y, 0.9)
    worst = worst_root_threshold(probabilities, y, roots, 0.9, min_melanomas=10)
    ham = np.array(roots) == "ham"
    assert (scores[ham & (y == 3)] >= pooled).mean() < 0.9  # pooled: the HAM root misses melanomas
    assert worst == pytest.approx(0.10 - 1e-6)  # the 9th of HAM's ten melanoma scores
    for root in ("ham", "old"):
        mask = (np.array(roots) == root) & (y == 3)
        assert (scores[mask] >= worst).mean() >= 0.9
    # A root with too few melanomas to measure its own sensitivity counts in the pool only.
    assert worst_root_threshold(probabilities, y, roots, 0.9, min_melanomas=11) == pooled


def test_class_and_source_balance_trains_and_validation_is_scored_per_root(
    planted: dict[str, Path], tmp_path: Path
) -> None:
    supplement = tmp_path / "supplement"
    for n in range(12):
        label = ("melanoma", "nevus")[n % 2]
        lesion_image(supplement / label / f"ISIC_05{n:05d}.jpg", label, 7000 + n)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data", str(planted["root"]), "--data", str(supplement),
                                      "--ground-truth", str(planted["truth"]), "--out", str(run_dir),
                                      "--epochs", "1", "--input-size", "32",
                                      "--backbone", "dermnet", "--width", "4", "--batch-size", "16",
                                      "--epoch-images", "64"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "training.json").read_text())["options"]["balance"] == "class-and-source"
    from dermwatch.training.evaluate import evaluation_sets
    from dermwatch.training.export import read_manifest

    rows = read_manifest(run_dir / "manifest.csv")
    sets = {name: chosen for name, chosen, _ in evaluation_sets(rows)}
    assert set(sets) == {"validation", "test_published", "test_leak_free", "validation:isic9",
                         "validation:supplement"}
    assert len(sets["validation:isic9"]) + len(sets["validation:supplement"]) == len(sets["validation"])
    assert {r.root for r in sets["validation:supplement"]} == {"supplement"}
    # One root: no per-root sets.
    assert {name for name, _, _ in evaluation_sets([r for r in rows if r.root == "isic9"])} == {
        "validation", "test_published", "test_leak_free"}


def test_a_root_with_a_handful_of_a_class_is_weighed_with_its_largest_root() -> None:
    from dermwatch.training.data import class_and_source_weights

    # HAM10000 brings 1 actinic keratosis beside isic9's 114: alone it would carry half the class.
    labels = np.array([0] * 114 + [0] + [4] * 50 + [4] * 40)
    roots = ["isic9"] * 114 + ["ham10000"] + ["isic9"] * 50 + ["ham10000"] * 40
    weights = class_and_source_weights(labels, roots)
    assert weights[114] == pytest.approx(weights[0])  # the lone image weighs like its isic9 classmates
    assert weights.max() < 2.0
    nevi = weights[115:]
    assert nevi[:50].sum() == pytest.approx(nevi[50:].sum())  # 40 of 50 is a root of its own


def test_an_external_root_is_scored_as_its_own_set_with_the_nevus_flag_rate(flag_everything_model: Path,
                                                                             tmp_path: Path) -> None:
    from dermwatch.training.evaluate import evaluate_model

    clinic = tmp_path / "clinic"
    for n in range(6):
        label = ("melanoma", "nevus", "dermatofibroma")[n % 3]
        write_jpeg(clinic / label / f"case{n}.jpg", seed=900 + n)
    results = evaluate_model(flag_everything_model, [], threads=1, external_roots=(clinic,))
    external = results["sets"]["external:clinic"]
    assert external["images"] == 6 and external["melanoma_images"] == 2
    assert external["per_class"]["nevus"]["support"] == 2
    assert external["nevus_flag_rate"] == 1.0 and external["melanoma_specificity"] == 0.0
