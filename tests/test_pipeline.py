"""One image through the pipeline: every kind of bad input ends in the right place, with a reason."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from conftest import totals, write_jpeg
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from dermwatch.config import Settings, load_settings
from dermwatch.pipeline.process import Processor, open_processor
from dermwatch.store.models import Image as ImageRow
from dermwatch.store.models import Prediction, Rejection, Sighting


@pytest.fixture
def processor(settings: Settings) -> Processor:
    return open_processor(settings)


@pytest.fixture
def on_each_database(any_database_config: Path) -> tuple[Processor, Settings]:
    """A processor and its settings on SQLite, then on PostgreSQL."""
    settings = load_settings(any_database_config)
    return open_processor(settings), settings


def run_one(processor: Processor, path: Path):
    (outcome,) = processor.process([processor.claim(path)])
    return outcome


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height but holds almost nothing: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_good_jpeg_is_classified_stored_and_archived(on_each_database: tuple[Processor, Settings]) -> None:
    processor, settings = on_each_database
    source = write_jpeg(settings.paths.intake / "lesion 1.jpg", seed=1)
    size = source.stat().st_size
    outcome = run_one(processor, source)
    assert outcome.status == "classified"
    assert not source.exists()
    with Session(processor.engine) as session:
        image = session.scalars(select(ImageRow)).one()
        prediction = session.scalars(select(Prediction)).one()
        assert (image.original_name, image.bytes, image.width, image.height) == ("lesion 1.jpg", size, 96, 72)
        assert Path(image.archive_path).is_file()
        assert Path(image.archive_path).name.endswith("-lesion 1.jpg")
        assert sum(prediction.probabilities().values()) == pytest.approx(1.0, abs=1e-4)
        assert prediction.model_sha256 == processor.card.sha256
        assert prediction.flagged == (prediction.melanoma_score >= 0.5)
    assert [p for p in processor.work_dir.rglob("*") if not p.is_dir()] == []  # its emptied folder is kept
    processor.tidy()
    assert list(processor.work_dir.glob("*")) == []  # on PostgreSQL the worker's own folder is gone too


def test_a_spare_claim_folder_removed_behind_the_service_is_made_anew(processor: Processor,
                                                                     settings: Settings) -> None:
    first = processor.claim(write_jpeg(settings.paths.intake / "first.jpg", seed=24))
    processor.process([first])
    assert processor.recover() == []  # reclaim() removes empty folders, the spare among them
    assert list(processor.work_dir.iterdir()) == []
    second = processor.claim(write_jpeg(settings.paths.intake / "second.jpg", seed=25))
    assert second is not None and second.work_path.is_file()
    assert processor.process([second])[0].status == "classified"


def test_a_claim_folder_is_reused_under_a_new_token_and_strays_never_ride_along(processor: Processor,
                                                                                 settings: Settings) -> None:
    first = processor.claim(write_jpeg(settings.paths.intake / "first.jpg", seed=21))
    processor.process([first])
    second = processor.claim(write_jpeg(settings.paths.intake / "second.jpg", seed=22))
    # The first claim's emptied folder, renamed: a restart never mistakes the second for the first.
    assert second.token != first.token and not first.work_path.parent.exists()
    assert sorted(p.name for p in processor.work_dir.iterdir()) == [second.token]
    (second.work_path.parent / "stray.jpg").write_bytes(b"put here by hand")
    processor.process([second])
    assert list(processor.work_dir.iterdir()) == []  # not kept: the stray would ride into the next claim
    third = processor.claim(write_jpeg(settings.paths.intake / "third.jpg", seed=23))
    assert [p.name for p in third.work_path.parent.iterdir()] == ["third.jpg"]
    assert processor.process([third])[0].status == "classified"
    assert totals(settings)["sightings"] == 3


def test_same_bytes_twice_gives_one_prediction_and_two_sightings(on_each_database: tuple[Processor, Settings]) -> None:
    processor, settings = on_each_database
    first = write_jpeg(settings.paths.intake / "a.jpg", seed=2)
    data = first.read_bytes()
    assert run_one(processor, first).status == "classified"
    again = settings.paths.intake / "b.jpg"
    again.write_bytes(data)
    assert run_one(processor, again).status == "seen before"
    counts = totals(settings)
    assert (counts["images"], counts["sightings"], counts["predictions"], counts["quarantined"]) == (1, 2, 1, 0)


def test_same_bytes_twice_in_one_batch(on_each_database: tuple[Processor, Settings]) -> None:
    processor, settings = on_each_database
    one = write_jpeg(settings.paths.intake / "one.jpg", seed=3)
    two = settings.paths.intake / "two.jpg"
    two.write_bytes(one.read_bytes())
    outcomes = processor.process([processor.claim(one), processor.claim(two)])
    assert [o.status for o in outcomes] == ["classified", "seen before"]
    counts = totals(settings)
    assert (counts["predictions"], counts["sightings"]) == (1, 2)


def _truncated(path: Path) -> Path:
    data = write_jpeg(path, seed=4, size=(400, 300)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _cmyk(path: Path) -> Path:
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (60, 80, 4), dtype=np.uint8), "CMYK").save(path, "JPEG")
    return path


def _alpha(path: Path) -> Path:
    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 256, (60, 80, 4), dtype=np.uint8)
    pixels[:30, :, 3] = 0
    Image.fromarray(pixels, "RGBA").save(path, "PNG")
    return path


def _sixteen_bit(path: Path) -> Path:
    ramp = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    Image.fromarray(ramp).save(path, "PNG")
    return path


def _bmp(path: Path) -> Path:
    """As PH2's dermatoscope software writes its images: uncompressed BMP."""
    Image.fromarray(np.random.default_rng(11).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path, "BMP")
    return path


def _tiff(path: Path) -> Path:
    """A lossless archive copy: LZW-compressed TIFF, its directory written after the pixels."""
    pixels = np.random.default_rng(12).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "TIFF", compression="tiff_lzw")
    return path


def _exif_rotated(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return write_jpeg(path, seed=7, size=(120, 60), exif=exif.tobytes())


def _text(path: Path) -> Path:
    path.write_text("this is a referral letter, not a photograph\n")
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _tiny(path: Path) -> Path:
    return write_jpeg(path, seed=8, size=(8, 8))


def _heic(path: Path) -> Path:
    """The first box of an iPhone photo (ISO media, brand heic), then its coded data."""
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(range(256)) * 40)
    return path


def _gif(path: Path) -> Path:
    Image.new("RGB", (64, 64), "red").save(path, "GIF")
    return path


REJECTED = {
    "truncated.jpg": (_truncated, "damaged or truncated"),
    "empty.jpg": (_empty, "empty file"),
    "letter.jpg": (_text, "not an image file"),
    "bomb.png": (lambda p: png_header_only(p, 30000, 30000), "over the limit of 50000000"),
    "icon.jpg": (_tiny, "smaller than 32 pixels"),
    "anim.gif": (_gif, "unsupported image format GIF"),
    "IMG_0042.HEIC": (_heic, "HEIC/HEIF photo (an iPhone camera's default), which dermwatch does not read"),
}

ACCEPTED = {
    "alpha.png": (_alpha, (80, 60)),
    "archive.tif": (_tiff, (80, 60)),
    "cmyk.jpg": (_cmyk, (80, 60)),
    "ph2.bmp": (_bmp, (80, 60)),
    "sixteen.png": (_sixteen_bit, (64, 48)),
    "rotated.jpg": (_exif_rotated, (60, 120)),  # stored upright: sides swapped
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_unusable_file_is_quarantined_with_its_reason(processor: Processor, settings: Settings, name: str) -> None:
    make, reason = REJECTED[name]
    path = make(settings.paths.intake / name)
    outcome = run_one(processor, path)
    assert outcome.status == "rejected"
    assert reason in outcome.detail
    with Session(processor.engine) as session:
        rejection = session.scalars(select(Rejection)).one()
        assert rejection.original_name == name and reason in rejection.reason
        assert Path(rejection.quarantine_path).is_file()
    assert totals(settings)["predictions"] == 0


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_unusual_but_valid_image_is_classified(processor: Processor, settings: Settings, name: str) -> None:
    make, upright_size = ACCEPTED[name]
    outcome = run_one(processor, make(settings.paths.intake / name))
    assert outcome.status == "classified", outcome.detail
    with Session(processor.engine) as session:
        image = session.scalars(select(ImageRow)).one()
        assert (image.width, image.height) == upright_size


def test_exif_rotation_reaches_the_model_upright() -> None:
    from dermwatch.pipeline.decode import read_rgb

    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.zeros((60, 120, 3), dtype=np.uint8)
    pixels[:, :60] = 255  # left half white as stored; the top half once rotated clockwise
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif.tobytes())
    upright = np.asarray(read_rgb(buffer.getvalue(), max_pixels=10**6).image)
    assert upright.shape == (120, 60, 3)
    assert upright[:50].mean() > 200 and upright[70:].mean() < 50


@pytest.mark.parametrize("save", [{"format": "JPEG"}, {"format": "PNG"}, {"format": "BMP"},
                                  {"format": "TIFF"}, {"format": "TIFF", "compression": "tiff_lzw"}],
                         ids=["jpeg", "png", "bmp", "tiff", "tiff-lzw"])
def test_an_image_cut_short_is_not_taken_for_whole(tmp_path: Path, save: dict[str, str]) -> None:
    """A copy that pauses must not be classified (and quarantined) half-written, in any format read."""
    from dermwatch.watcher.settle import looks_whole

    whole = tmp_path / "whole"
    Image.fromarray(np.random.default_rng(13).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(whole, **save)
    data = whole.read_bytes()
    assert looks_whole(whole)
    part = tmp_path / "part"
    for length in (len(data) - 1, len(data) // 2, 40):
        part.write_bytes(data[:length])
        assert not looks_whole(part), f"{length} of {len(data)} bytes"


def test_a_fifo_is_quarantined_without_blocking(processor: Processor, settings: Settings) -> None:
    """A plain open() of a FIFO waits for a writer forever; intake must move on with a reason."""
    import os

    from dermwatch.watcher.settle import looks_whole

    fifo = settings.paths.intake / "fifo.jpg"
    os.mkfifo(fifo)
    assert looks_whole(fifo)  # judged by the pipeline, never opened blocking
    outcome = run_one(processor, fifo)
    assert outcome.status == "rejected" and "not a regular file (a FIFO)" in outcome.detail
    assert not fifo.exists() and totals(settings)["predictions"] == 0


def test_symlink_is_refused_and_its_target_untouched(processor: Processor, settings: Settings, tmp_path: Path) -> None:
    target = write_jpeg(tmp_path / "elsewhere" / "private.jpg", seed=9)
    link = settings.paths.intake / "link.jpg"
    link.symlink_to(target)
    outcome = run_one(processor, link)
    assert outcome.status == "rejected" and "symbolic link" in outcome.detail
    assert target.is_file() and not link.exists()
    assert totals(settings)["predictions"] == 0


def test_sidecar_is_stored_with_the_image(processor: Processor, settings: Settings) -> None:
    image = write_jpeg(settings.paths.intake / "back.jpg", seed=10)
    sidecar = {"patient_reference": "P-0042", "body_site": "left shoulder", "notes": "changed colour"}
    (settings.paths.intake / "back.json").write_text(json.dumps(sidecar))
    assert run_one(processor, image).status == "classified"
    with Session(processor.engine) as session:
        row = session.scalars(select(ImageRow)).one()
        assert row.sightings[0].sidecar == sidecar
        assert Path(row.archive_path).with_suffix(".json").is_file()
    assert not (settings.paths.intake / "back.json").exists()


@pytest.mark.parametrize(
    "content, reason",
    [("{not json", "not valid JSON"), ('["a"]', "JSON object"), ('{"patient_refrence": "P-1"}', "unknown key"),
     ('{"body_site": 3}', "must be text")],
)
def test_bad_sidecar_quarantines_image_and_sidecar(processor: Processor, settings: Settings, content: str,
                                                   reason: str) -> None:
    image = write_jpeg(settings.paths.intake / "arm.jpg", seed=11)
    (settings.paths.intake / "arm.json").write_text(content)
    outcome = run_one(processor, image)
    assert outcome.status == "rejected" and reason in outcome.detail
    quarantined = sorted(p.name.partition("-")[2] for p in settings.paths.quarantine.iterdir())
    assert quarantined == ["arm.jpg", "arm.json"]


def test_a_bad_sidecar_is_refused_even_with_an_image_seen_before(processor: Processor, settings: Settings) -> None:
    image = write_jpeg(settings.paths.intake / "arm.jpg", seed=11)
    again = settings.paths.intake.parent / "again.jpg"
    again.write_bytes(image.read_bytes())
    assert run_one(processor, image).status == "classified"
    again = again.rename(settings.paths.intake / "again.jpg")
    (settings.paths.intake / "again.json").write_text("{not json")
    outcome = run_one(processor, again)
    assert outcome.status == "rejected" and "not valid JSON" in outcome.detail
    assert sorted(p.name.partition("-")[2] for p in settings.paths.quarantine.iterdir()) == ["again.jpg", "again.json"]
    assert totals(settings)["sightings"] == 1


def test_a_file_that_vanished_before_its_claim_is_skipped(processor: Processor, settings: Settings) -> None:
    assert processor.claim(settings.paths.intake / "gone.jpg") is None
    assert totals(settings) == {"images": 0, "sightings": 0, "predictions": 0, "flagged": 0, "quarantined": 0}


def test_a_claim_deleted_from_work_by_hand_has_one_fate_and_holds_nothing_up(processor: Processor,
                                                                             settings: Settings) -> None:
    gone = processor.claim(write_jpeg(settings.paths.intake / "gone.jpg", seed=13))
    kept = processor.claim(write_jpeg(settings.paths.intake / "kept.jpg", seed=14))
    gone.work_path.unlink()
    outcomes = processor.process([gone, kept])
    assert sorted((o.name, o.status) for o in outcomes) == [("gone.jpg", "rejected"), ("kept.jpg", "classified")]
    assert "No such file" in next(o.detail for o in outcomes if o.name == "gone.jpg")
    assert processor.recover() == [] and list(settings.paths.work.iterdir()) == []
    assert (totals(settings)["quarantined"], totals(settings)["sightings"]) == (1, 1)


def test_recover_finishes_a_committed_arrival_without_counting_it_twice(
        on_each_database: tuple[Processor, Settings]) -> None:
    processor, settings = on_each_database
    source = write_jpeg(settings.paths.intake / "c.jpg", seed=12)
    item = processor.claim(source)
    processor.process([item])
    # Simulate a crash between commit and archive: put the file back into work/.
    with Session(processor.engine) as session:
        archived = Path(session.scalars(select(ImageRow)).one().archive_path)
    item.work_path.parent.mkdir(exist_ok=True)
    archived.rename(item.work_path)
    outcomes = processor.recover()
    assert [o.status for o in outcomes] == ["classified"]
    assert totals(settings)["sightings"] == 1
    assert archived.is_file() and not item.work_path.exists()


def test_one_sighting_per_arrival_is_recorded_with_its_time(on_each_database: tuple[Processor, Settings]) -> None:
    processor, settings = on_each_database
    run_one(processor, write_jpeg(settings.paths.intake / "d.jpg", seed=13))
    with Session(processor.engine) as session:
        sighting = session.scalars(select(Sighting)).one()
        assert sighting.received_at.tzinfo is not None


def test_the_same_image_for_two_patients_keeps_both_references(on_each_database: tuple[Processor, Settings]) -> None:
    processor, settings = on_each_database
    first = write_jpeg(settings.paths.intake / "a.jpg", seed=20)
    data = first.read_bytes()
    (settings.paths.intake / "a.json").write_text('{"patient_reference": "P-1", "notes": "first"}')
    assert run_one(processor, first).status == "classified"
    again = settings.paths.intake / "b.jpg"
    again.write_bytes(data)
    (settings.paths.intake / "b.json").write_text('{"patient_reference": "P-2"}')
    assert run_one(processor, again).status == "seen before"
    with Session(processor.engine) as session:
        sidecars = [s.sidecar for s in session.scalars(select(Sighting).order_by(Sighting.id))]
    assert sidecars == [{"patient_reference": "P-1", "notes": "first"}, {"patient_reference": "P-2"}]
    assert len(list(settings.paths.archive.rglob("*.json"))) == 2


def test_a_huge_sidecar_is_refused_without_reading_it(processor: Processor, settings: Settings) -> None:
    import tracemalloc

    image = write_jpeg(settings.paths.intake / "big.jpg", seed=21)
    with (settings.paths.intake / "big.json").open("wb") as handle:
        handle.truncate(50 * 1024 * 1024)
    tracemalloc.start()
    outcome = run_one(processor, image)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert outcome.status == "rejected" and "sidecar big.json is over 65536 bytes" in outcome.detail
    assert peak < 10 * 1024 * 1024


def test_archive_folders_follow_the_site_time_zone(config_file: Path) -> None:
    from datetime import datetime, timezone

    # A zone whose date differs from UTC's right now, so a UTC-dated folder would be caught.
    zone = "Pacific/Kiritimati" if datetime.now(timezone.utc).hour >= 10 else "Pacific/Pago_Pago"
    config_file.write_text(config_file.read_text() + f'[site]\ntimezone = "{zone}"\n')
    processor = open_processor(load_settings(config_file))
    assert run_one(processor, write_jpeg(processor.paths.intake / "z.jpg", seed=22)).status == "classified"
    with Session(processor.engine) as session:
        image = session.scalars(select(ImageRow)).one()
    local_day = image.received_at.astimezone(ZoneInfo(zone)).date()
    assert local_day != image.received_at.date()
    assert Path(image.archive_path).parent == processor.paths.archive / local_day.strftime("%Y/%m/%d")
    assert Path(image.archive_path).is_file()


def test_a_name_too_long_for_a_prefix_is_shortened_in_archive_and_quarantine(processor: Processor,
                                                                            settings: Settings) -> None:
    name = "ä" * 125 + ".jpg"  # 254 bytes
    assert run_one(processor, write_jpeg(settings.paths.intake / name, seed=23)).status == "classified"
    (settings.paths.intake / name).write_bytes(b"not an image")
    assert run_one(processor, settings.paths.intake / name).status == "rejected"
    for folder in (settings.paths.archive, settings.paths.quarantine):
        (placed,) = [p for p in folder.rglob("*.jpg")]
        assert len(placed.name.encode()) <= 255 and placed.name.endswith("ää.jpg")
