"""Audit one-folder-per-class data and turn it into a manifest a training run can trust.

The 9-class ISIC copy files the same bytes under two labels, holds several photos of one
lesion, and repeats Train images in Test. The manifest says, per file, which label to
believe, which lesion group it belongs to (so no group crosses a split), which split it
goes to, and why a file is left out.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import imagehash
import numpy as np

from dermwatch.errors import RejectedImage
from dermwatch.labels import CLASS_NAMES
from dermwatch.pipeline.decode import read_rgb
from dermwatch.training.ground_truth import Truth, load_ground_truth
from dermwatch.training.scan import ScannedFile, scan_roots

#: Perceptual-hash distance (bits of 64) at or below which two images are one photo.
NEAR_DUPLICATE_BITS = 4
#: First image id of the HAM10000 collection; lower ids come from the older ISIC archive.
HAM10000_FIRST_ID = "ISIC_0024306"
#: Far above any photo in the data, far below a decompression bomb.
TRAINING_MAX_PIXELS = 50_000_000


@dataclass
class ManifestRow:
    """One file of the data, and what training does with it."""

    path: str
    root: str
    origin: str  # train | test: the folder it sits in
    image_id: str
    sha256: str
    phash: str
    folder_label: str
    resolved_label: str  # empty when dropped for a label conflict
    label_source: str  # folder | ground truth | folder, agreeing with ground truth
    lesion_group: str
    split: str  # train | val | test | test_leaky | "" when dropped
    dropped: str  # why the file is left out, empty when used
    note: str  # for test_leaky rows: which training file it leaks from


@dataclass
class Audit:
    rows: list[ManifestRow]
    findings: list[str]


def audit(roots: list[Path], ground_truth: Path | None, *, val_fraction: float = 0.2, seed: int = 0) -> Audit:
    """Scan ``roots``, resolve labels, group lesions, split, and describe every defect."""
    files = scan_roots(roots)
    truths = load_ground_truth(ground_truth) if ground_truth else {}
    rows = [_initial_row(f) for f in files]
    findings: list[str] = [f"{len(rows)} image files under {len({r.root for r in rows})} root(s)"]

    _compute_phashes(rows)
    findings += _resolve_labels(rows, truths)
    findings += _drop_repeated_copies(rows)
    groups = _lesion_groups(rows, truths)
    findings += _describe_groups(rows, groups, truths)
    _split(rows, val_fraction, seed)
    findings += _mark_test_leaks(rows)
    findings += _describe_sources(rows)
    findings += _describe_result(rows)
    return Audit(rows=rows, findings=findings)


def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    """Write the manifest as CSV, one row per file, in scan order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(ManifestRow)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def _initial_row(f: ScannedFile) -> ManifestRow:
    return ManifestRow(
        path=str(f.path), root=f.root, origin=f.origin, image_id=f.image_id, sha256=f.sha256,
        phash="", folder_label=f.folder_label, resolved_label=f.folder_label,
        label_source="folder", lesion_group="", split="", dropped="", note="",
    )


def _compute_phashes(rows: list[ManifestRow]) -> None:
    for row in rows:
        try:
            decoded = read_rgb(Path(row.path), max_pixels=TRAINING_MAX_PIXELS)
        except RejectedImage as rejection:
            row.dropped = f"unreadable: {rejection}"
            continue
        row.phash = str(imagehash.phash(decoded.image))


def _resolve_labels(rows: list[ManifestRow], truths: dict[str, Truth]) -> list[str]:
    """Give each distinct content one label: ground truth first, then the folder."""
    by_sha: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        by_sha[row.sha256].append(row)
    conflicts: Counter[tuple[str, ...]] = Counter()
    conflict_places: Counter[tuple[tuple[str, ...], str]] = Counter()
    outcomes: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
    relabelled: Counter[tuple[str, str]] = Counter()
    for copies in by_sha.values():
        folder_labels = {r.folder_label for r in copies}
        truth = next((truths[r.image_id] for r in copies if r.image_id in truths), None)
        label, source = _resolve(folder_labels, truth)
        if len(folder_labels) > 1:
            pair = tuple(sorted(folder_labels))
            conflicts[pair] += 1
            conflict_places[pair, "+".join(sorted({r.origin for r in copies}))] += 1
            outcomes[pair][label or "unresolved"] += 1
        for row in copies:
            if label is None:
                row.resolved_label = ""
                row.dropped = (
                    f"filed as {' and '.join(sorted(folder_labels))}; the ground truth does not settle it"
                )
            else:
                if label != row.folder_label:
                    relabelled[row.folder_label, label] += 1
                row.resolved_label, row.label_source = label, source
    findings = []
    for pair, count in sorted(conflicts.items()):
        places = ", ".join(
            f"{n} within {where}" if "+" not in where else f"{n} across {where}"
            for (p, where), n in sorted(conflict_places.items()) if p == pair
        )
        resolved = ", ".join(f"{label}: {n}" for label, n in outcomes[pair].most_common())
        findings.append(
            f"byte-identical images filed under both {' and '.join(pair)}: {count} ({places}); "
            f"resolved as {resolved}"
        )
    for (old, new), n in sorted(relabelled.items()):
        findings.append(f"relabelled by ground truth: {n} file(s) in '{old}' are {new}")
    return findings


def _resolve(folder_labels: set[str], truth: Truth | None) -> tuple[str | None, str]:
    if truth and truth.classes:
        if len(truth.classes) == 1:
            (label,) = truth.classes
            return label, "ground truth"
        agreeing = folder_labels & truth.classes
        if len(agreeing) == 1:
            (label,) = agreeing
            return label, "folder, agreeing with ground truth"
        return None, ""
    if len(folder_labels) == 1:
        (label,) = folder_labels
        return label, "folder"
    return None, ""


def _drop_repeated_copies(rows: list[ManifestRow]) -> list[str]:
    """Keep one file per content within each origin; Train/Test repeats are leaks, not drops.

    The kept copy is the one named plainly by its id (ISIC_0025601.jpg over ISIC_0025601(1).jpg).
    """
    copies: dict[tuple[str, str], list[ManifestRow]] = defaultdict(list)
    for row in rows:
        copies[row.sha256, row.origin].append(row)
    repeats: list[str] = []
    for group in copies.values():
        kept = min(group, key=lambda r: (Path(r.path).stem != r.image_id, len(r.path), r.path))
        for row in group:
            if row is kept:
                continue
            if not row.dropped:
                row.dropped = f"byte-identical copy of {kept.path}"
            if row.folder_label == kept.folder_label:
                repeats.append(f"{Path(kept.path).name} = {Path(row.path).name} ({row.folder_label})")
    if not repeats:
        return []
    return [f"byte-identical pairs within one class: {len(repeats)} ({'; '.join(sorted(repeats))})"]


def _lesion_groups(rows: list[ManifestRow], truths: dict[str, Truth]) -> dict[int, list[int]]:
    """Join files that share bytes, a lesion id, or a near-identical picture."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    by_key: dict[str, int] = {}
    for i, row in enumerate(rows):
        lesion = truths[row.image_id].lesion_id if row.image_id in truths else ""
        for key in (f"sha:{row.sha256}", f"lesion:{lesion}" if lesion else ""):
            if key:
                union(i, by_key.setdefault(key, i))
    for i, j in _near_duplicate_pairs(rows):
        union(i, j)

    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(rows)):
        groups[find(i)].append(i)
    for members in groups.values():
        lesions = sorted({truths[rows[i].image_id].lesion_id for i in members if rows[i].image_id in truths} - {""})
        name = lesions[0] if lesions else f"image:{min(rows[i].image_id for i in members)}"
        for i in members:
            rows[i].lesion_group = name
    return groups


def _near_duplicate_pairs(rows: list[ManifestRow]) -> list[tuple[int, int]]:
    indices = [i for i, r in enumerate(rows) if r.phash]
    hashes = np.array([int(rows[i].phash, 16) for i in indices], dtype=np.uint64)
    pairs = []
    for a in range(len(hashes) - 1):
        xor = hashes[a] ^ hashes[a + 1 :]
        distance = np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        for b in np.nonzero(distance <= NEAR_DUPLICATE_BITS)[0]:
            i, j = indices[a], indices[a + 1 + int(b)]
            if rows[i].sha256 != rows[j].sha256:
                pairs.append((i, j))
    return pairs


def _describe_groups(rows: list[ManifestRow], groups: dict[int, list[int]], truths: dict[str, Truth]) -> list[str]:
    near = _near_duplicate_pairs(rows)
    near_text = "; ".join(
        f"{Path(rows[i].path).name} ({rows[i].folder_label}) ~ {Path(rows[j].path).name} ({rows[j].folder_label})"
        for i, j in near[:10]
    )
    lesion_images: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        truth = truths.get(row.image_id)
        if truth and truth.lesion_id:
            lesion_images[truth.lesion_id].add(row.image_id)
    multi = {lesion: ids for lesion, ids in lesion_images.items() if len(ids) > 1}
    findings = [
        f"lesions photographed more than once (ground-truth lesion ids): {len(multi)} lesions, "
        f"{sum(len(ids) for ids in multi.values())} distinct images",
        f"near-identical images with different bytes (perceptual hash within {NEAR_DUPLICATE_BITS} bits): "
        f"{len(near)} pair(s){': ' + near_text if near else ''}{' ...' if len(near) > 10 else ''}",
        f"lesion groups after joining twins, lesion ids and near-identical images: {len(groups)}",
    ]
    return findings


def _split(rows: list[ManifestRow], val_fraction: float, seed: int) -> None:
    """Stratified, seeded split of the training pool by lesion group."""
    pool_groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        if row.origin == "test":
            row.split = "test" if not row.dropped else ""
        elif not row.dropped:
            pool_groups[row.lesion_group].append(row)
    by_class: dict[str, list[str]] = defaultdict(list)
    for name, members in sorted(pool_groups.items()):
        majority = Counter(r.resolved_label for r in members).most_common(1)[0][0]
        by_class[majority].append(name)
    rng = np.random.default_rng(seed)
    for label in CLASS_NAMES:
        names = by_class.get(label, [])
        order = rng.permutation(len(names))
        target = round(val_fraction * sum(len(pool_groups[n]) for n in names))
        taken = 0
        for index in order:
            members = pool_groups[names[index]]
            split = "val" if taken < target else "train"
            taken += len(members) if split == "val" else 0
            for row in members:
                row.split = split


def _mark_test_leaks(rows: list[ManifestRow]) -> list[str]:
    """A Test file whose bytes or lesion also sit in the training folders measures nothing."""
    pool_by_group: dict[str, ManifestRow] = {}
    for row in rows:
        if row.origin == "train":
            pool_by_group.setdefault(row.lesion_group, row)
    test_rows = [r for r in rows if r.origin == "test"]
    twins = siblings = 0
    for row in test_rows:
        relative = pool_by_group.get(row.lesion_group)
        if relative is None:
            continue
        same_bytes = any(r.sha256 == row.sha256 for r in rows if r.origin == "train")
        twins += same_bytes
        siblings += not same_bytes
        row.split = "test_leaky"
        row.note = f"{'same bytes as' if same_bytes else 'same lesion as'} {relative.path}"
    if not test_rows:
        return []
    cross_label = sum(
        1 for r in test_rows
        if any(p.sha256 == r.sha256 and p.folder_label != r.folder_label for p in rows if p.origin == "train")
    )
    return [
        f"Test files that also sit in the training folders under another label: {cross_label}",
        f"Test files with the same image ({twins}) or another photo of the same lesion ({siblings}) "
        f"in the training folders: {twins + siblings} of {len(test_rows)}; leak-free Test: "
        f"{len(test_rows) - twins - siblings}",
    ]


def _describe_sources(rows: list[ManifestRow]) -> list[str]:
    """Which camera era each class comes from, in training and in Test: a network can learn
    the camera instead of the lesion, and a Test class from the other era will show it."""
    findings = []
    for origin, title in (("train", "training files"), ("test", "Test files")):
        table: dict[str, Counter[str]] = defaultdict(Counter)
        for row in rows:
            if row.origin == origin and not row.dropped and row.image_id.startswith("ISIC_"):
                era = "HAM10000" if row.image_id >= HAM10000_FIRST_ID else "older archive"
                table[row.resolved_label][era] += 1
        parts = [
            f"{label}: {table[label]['older archive']} older / {table[label]['HAM10000']} HAM10000"
            for label in CLASS_NAMES if label in table
        ]
        if parts:
            findings.append(f"source of the {title} by class (camera bias): " + "; ".join(parts))
    return findings


def _describe_result(rows: list[ManifestRow]) -> list[str]:
    findings = []
    verified_sk = Counter(
        r.root for r in rows
        if r.resolved_label == "seborrheic keratosis" and not r.dropped and r.origin == "train"
    )
    findings.append(
        "seborrheic keratosis kept for training, by root: "
        + (", ".join(f"{root}: {n}" for root, n in sorted(verified_sk.items())) or "none")
    )
    dropped = Counter(r.dropped.split(":")[0].split(" of ")[0] for r in rows if r.dropped)
    findings.append("dropped: " + (", ".join(f"{why}: {n}" for why, n in dropped.most_common()) or "none"))
    for split in ("train", "val", "test", "test_leaky"):
        counts = Counter(r.resolved_label for r in rows if r.split == split)
        if counts:
            findings.append(
                f"{split}: {sum(counts.values())} ("
                + ", ".join(f"{label}: {counts[label]}" for label in CLASS_NAMES if counts[label])
                + ")"
            )
    return findings
