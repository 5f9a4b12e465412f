"""The training side of the CLI: audit, train, export, evaluate. Imported only when used."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from dermwatch.preprocess import COLOUR_MODES, CROP_MODES
from dermwatch.training.audit import audit, write_manifest
from dermwatch.training.metrics import figure
from dermwatch.training.model_names import ARCHITECTURES
from dermwatch.training.options import BALANCE_MODES, COLOUR_JITTER_NAMES, ZOOM_NAMES, TrainOptions, split_seed_of
from dermwatch.training.run_start import RunStart

#: The default recipe: one definition, in TrainOptions.
DEFAULTS = TrainOptions()

def data_roots_option(required: bool):
    """--data, repeatable; ``required`` unless the command can take the roots from elsewhere."""
    return click.option(
        "--data", "data_roots", multiple=True, required=required,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="A data root: class folders, or Train/ and Test/ holding them. Repeat for several.",
    )

ground_truth_option = click.option(
    "--ground-truth", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="ISIC ground-truth CSV (image, lesion_id, diagnosis) to resolve labels and group lesions.",
)
seed_option = click.option("--seed", default=DEFAULTS.seed, show_default=True,
                           help="Seed of the split and of training.")


@click.command("audit")
@click.argument("data_roots", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@ground_truth_option
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=Path("manifest.csv"),
              show_default=True, help="Where to write the manifest CSV.")
@seed_option
def audit_command(data_roots: tuple[Path, ...], ground_truth: Path | None, manifest: Path, seed: int) -> None:
    """Find duplicates, label conflicts, same-lesion groups and leaks in DATA_ROOTS."""
    result = audit(list(data_roots), ground_truth, seed=seed)
    write_manifest(result.rows, manifest)
    for finding in result.findings:
        click.echo(f"- {finding}")
    click.echo(f"manifest: {manifest}")


@click.command("train")
@data_roots_option(required=False)  # not with --resume: the run keeps its own
@ground_truth_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the manifest, the Keras model, training.json and the per-epoch checkpoints.")
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Continue a stopped run from its last checkpoint, with the data and options it was started "
                   "with (give no other option).")
@click.option("--backbone", "--arch", "arch", type=click.Choice(ARCHITECTURES), default=DEFAULTS.arch,
              show_default=True, help="efficientnet-lite0 starts from ImageNet weights; dermnet is dermwatch's own "
                                      "CNN, trained from scratch.")
@click.option("--input-size", default=DEFAULTS.input_size, show_default=True, help="Side of the square model input.")
@click.option("--width", default=DEFAULTS.width, show_default=True, help="Filters of the first stage (dermnet).")
@click.option("--epochs", default=DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", default=DEFAULTS.batch_size, show_default=True)
@click.option("--learning-rate", default=DEFAULTS.learning_rate, show_default=True)
@click.option("--weight-decay", default=DEFAULTS.weight_decay, show_default=True, help="AdamW's decoupled decay.")
@click.option("--label-smoothing", default=DEFAULTS.label_smoothing, show_default=True)
@click.option("--warmup-epochs", default=DEFAULTS.warmup_epochs, show_default=True,
              help="Epochs of linear learning-rate warm-up before the cosine decay.")
@click.option("--balance", type=click.Choice(BALANCE_MODES), default=DEFAULTS.balance, show_default=True,
              help="Class imbalance: inverse-frequency class weights; the same with each --data root weighed equally "
                   "within a class; or log-prior logit adjustment after training.")
@click.option("--colour", type=click.Choice(COLOUR_MODES), default=DEFAULTS.colour, show_default=True,
              help="shades-of-grey removes each image's colour cast, luminance leaves colour out, before "
                   "training (and, via the card, before inference).")
@click.option("--colour-jitter", type=click.Choice(COLOUR_JITTER_NAMES), default=DEFAULTS.colour_jitter,
              show_default=True,
              help="How far augmentation moves each training image's colours; strong also changes each "
                   "channel's gain, as another camera's white balance would.")
@click.option("--zoom", type=click.Choice(ZOOM_NAMES), default=DEFAULTS.zoom, show_default=True,
              help="How far augmentation zooms: mild about 10 % either way; strong also magnifies up to 2x, as "
                   "a clinic that frames lesions tightly shows them.")
@click.option("--crop", type=click.Choice(CROP_MODES), default=DEFAULTS.crop, show_default=True,
              help="Cut each image to the square around its lesion before training (and, via the card, "
                   "before inference).")
@click.option("--epoch-images", default=DEFAULTS.epoch_images, show_default=True, type=click.IntRange(min=0),
              help="Each epoch draws this many training images, each as likely as --balance weighs it, with an "
                   "unweighted loss; 0: every image once per epoch, the loss weighted by --balance instead.")
@click.option("--ema/--no-ema", default=DEFAULTS.ema, show_default=True,
              help="Score and keep an exponential moving average of the weights instead of the raw weights.")
@seed_option
@click.option("--split-seed", type=int, default=None,
              help="Seed of the lesion-grouped split alone (default: --seed). Members of a seed ensemble share "
                   "one split, so each member's validation images are unseen by every member.")
@click.option("--batch-workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Threads that make training batches on a backend other than TensorFlow (JAX on a GPU): "
                   "more keep a GPU busy; the augmentation's random stream then varies run to run.")
@click.pass_context
def train_command(context: click.Context, data_roots: tuple[Path, ...], ground_truth: Path | None,
                  out_dir: Path | None, resume_dir: Path | None, batch_workers: int, **recipe) -> None:
    """Audit the data, split it by lesion, and train a network; or continue a stopped run."""
    from dermwatch.training.train import train

    if resume_dir is not None:
        runtime_only = {"resume_dir", "batch_workers"}
        given = [name for name in context.params
                 if name not in runtime_only and context.get_parameter_source(name).name != "DEFAULT"]
        if given:
            raise click.UsageError(f"--resume takes the run's own data and options; drop {', '.join(given)}")
        started = RunStart.read(resume_dir)
        out_dir, options = resume_dir, started.options
    else:
        if not data_roots or out_dir is None:
            raise click.UsageError("give --data (one or more) and --out, or --resume RUN")
        options = TrainOptions(**recipe)
        started = RunStart(list(data_roots), ground_truth, options)
    result = audit(started.data_roots, started.ground_truth, seed=split_seed_of(asdict(options)))
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume_dir is None:
        started.write(out_dir)
    write_manifest(result.rows, out_dir / "manifest.csv")
    (out_dir / "audit.txt").write_text("".join(f"- {f}\n" for f in result.findings))
    record = train(result, out_dir, options, resume=resume_dir is not None, batch_workers=batch_workers)
    validation = record["validation"]
    click.echo(
        f"best epoch {record['best_epoch']}/{options.epochs} in {record['wall_seconds']:.0f} s; validation: "
        f"accuracy {validation['accuracy']:.3f}, balanced {validation['balanced_accuracy']:.3f}, "
        f"melanoma AUC {validation['melanoma_roc_auc']:.3f}; saved to {out_dir}"
    )


@click.command("ensemble")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the ensemble's run (then: dermwatch export OUT).")
def ensemble_command(run_dirs: tuple[Path, ...], out_dir: Path) -> None:
    """Average training runs of one recipe (same --split-seed) into one model, as a new run folder."""
    from dermwatch.training.ensemble import ensemble_run

    record = ensemble_run(list(run_dirs), out_dir)
    validation = record["validation"]
    click.echo(
        f"ensemble of {len(run_dirs)} runs; validation: accuracy {validation['accuracy']:.3f}, balanced "
        f"{validation['balanced_accuracy']:.3f}, melanoma AUC {validation['melanoma_roc_auc']:.3f}; saved to "
        f"{out_dir} (next: dermwatch export {out_dir})"
    )


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--version", help="Version recorded in the model card (default: ARCH+SIZE-YYYYMMDD).")
@click.option("--tta", is_flag=True,
              help="Average over the 8 flips and quarter turns inside the model (8x the compute); "
                   "temperature and threshold are refitted on validation for it.")
@click.option("--ship", is_flag=True,
              help="Copy the chosen model into the package (dermwatch/models/) as the service's default.")
@click.option("--external", "external_roots", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Another clinic's images (one folder per class), never trained on: scored into the card "
                   "as external:NAME; no threshold or choice is made on them.")
def export_command(run_dir: Path, version: str | None, tta: bool, ship: bool,
                   external_roots: tuple[Path, ...]) -> None:
    """Convert a training run to float32, dynamic (int8 weights) and int8 TFLite; check and score each."""
    from dermwatch.modelcard import load_card, shipped_model_path
    from dermwatch.training.export import NothingToShip, choose_shipped, export_run
    from dermwatch.training.export import ship as ship_model

    paths = export_run(run_dir, version, tta=tta, external_roots=external_roots)
    for path in paths:
        card = load_card(path).document
        check, sets = card["export_check"], card["evaluation"]["sets"]
        click.echo(f"{path} ({path.stat().st_size} bytes): top-1 agreement with Keras "
                   f"{check['top1_agreement']:.4f}, largest probability difference "
                   f"{check['max_probability_difference']:.4f}")
        for name, metrics in sets.items():
            click.echo(f"  {name:>21}: {_metrics_line(metrics)}")
    try:
        chosen = choose_shipped(paths)
    except NothingToShip as refusal:
        if ship:
            raise click.ClickException(f"nothing shipped: {refusal}") from None
        click.echo(f"no file can ship: {refusal}")
        return
    click.echo(f"chosen for shipping: {chosen.name}")
    if ship:
        click.echo(f"shipped as {ship_model(chosen, shipped_model_path().parent)}")


@click.command("evaluate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_roots_option(required=True)
@ground_truth_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results as JSON here (default: print only).")
@click.option("--html", type=click.Path(dir_okay=False, path_type=Path),
              help="Write an HTML model card with these results here.")
@click.option("--external", "external_roots", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Another clinic's images (one folder per class), never trained on: scored as external:NAME.")
def evaluate_command(model: Path, data_roots: tuple[Path, ...], ground_truth: Path | None, out: Path | None,
                     html: Path | None, external_roots: tuple[Path, ...]) -> None:
    """Score a TFLite MODEL on validation, Test as published and leak-free Test."""
    import json

    from dermwatch.errors import DataError
    from dermwatch.modelcard import load_card
    from dermwatch.training.card_html import render_card_html
    from dermwatch.training.evaluate import evaluate_model
    from dermwatch.training.train import data_fingerprint

    card = load_card(model).document
    training = card.get("training", {})
    result = audit(list(data_roots), ground_truth, seed=split_seed_of(training.get("options", {})))
    if training and data_fingerprint(result.rows) != training["data_fingerprint"]:
        raise DataError(
            "these data do not give the training/validation split this model was trained on "
            "(fingerprint differs): pass the same --data roots and --ground-truth as for training"
        )
    results = evaluate_model(model, result.rows, external_roots=external_roots)
    for name, metrics in results["sets"].items():
        click.echo(f"{name:>21}: {_metrics_line(metrics)}")
    if out:
        out.write_text(json.dumps(results, indent=2))
    if html:
        render_card_html({**card, "evaluation": results}, html)


def _metrics_line(m: dict) -> str:
    return (f"{m['images']} images, accuracy {m['accuracy']:.3f}, balanced {figure(m, 'balanced_accuracy')}, "
            f"melanoma AUC {figure(m, 'melanoma_roc_auc')} (vs nevus {figure(m, 'melanoma_vs_nevus_auc')}), "
            f"sensitivity {figure(m, 'melanoma_sensitivity')} "
            f"specificity {figure(m, 'melanoma_specificity')} (of {m['melanoma_images']} melanomas), "
            f"nevi flagged {figure(m, 'nevus_flag_rate')}, "
            f"ECE {m['expected_calibration_error']:.3f}")
