"""What a training run is asked to do. Free of TensorFlow, so the CLI can show the defaults."""

from __future__ import annotations

from dataclasses import dataclass

from dermwatch.preprocess import COLOUR_MODES, CROP_MODES

#: How far augmentation moves colours (data.COLOUR_JITTERS holds what each name means).
COLOUR_JITTER_NAMES = ("mild", "strong")
BALANCE_MODES = ("weights", "class-and-source", "logit-adjust", "none")


@dataclass(frozen=True)
class TrainOptions:
    """One network's recipe. The defaults are each member of the shipped seed ensemble: 96 px,
    12 epochs of 2,816 images drawn evenly over classes and, within a class, over data roots
    (14-17 minutes on every source with 2 cores)."""

    arch: str = "dermnet"
    input_size: int = 96
    width: int = 32
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # How class imbalance is handled: "weights" weights the loss by inverse class frequency;
    # "logit-adjust" trains on the data as it is and subtracts log(class prior) from the
    # logits afterwards (Menon et al., 2021), which targets balanced error; "class-and-source"
    # also weighs each data root equally within a class, so the root is no cue to the class;
    # "none" does neither.
    balance: str = "class-and-source"
    augment: bool = True  # flips, rotations, affine and colour jitter on the fly
    colour_jitter: str = "mild"  # COLOUR_JITTER_NAMES: how far augmentation moves colours
    schedule: str = "cosine"  # cosine: AdamW, warm-up then cosine decay; constant: plain Adam
    keep_best: bool = True  # restore the best validation epoch; False keeps the last one
    ema: bool = False  # score and keep an exponential moving average of the weights (cosine only)
    colour: str = "as-is"  # preprocess.COLOUR_MODES: "shades-of-grey" removes each image's colour cast
    crop: str = "whole-frame"  # preprocess.CROP_MODES: "lesion" cuts each image to the square around its lesion
    # 0: every training image once per epoch, balanced by loss weights. N: each epoch draws N
    # images, each as likely as the balance mode weighs it (data.epoch_draws), loss unweighted.
    epoch_images: int = 2816
    # The seed the lesion-grouped split was drawn with, when not ``seed`` (members of a seed
    # ensemble share one split). Recorded so `evaluate` can draw the same split again.
    split_seed: int | None = None

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"unknown balance mode {self.balance!r}; choose one of {', '.join(BALANCE_MODES)}")
        if self.colour not in COLOUR_MODES:
            raise ValueError(f"unknown colour mode {self.colour!r}; choose one of {', '.join(COLOUR_MODES)}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"unknown crop mode {self.crop!r}; choose one of {', '.join(CROP_MODES)}")
        if self.colour_jitter not in COLOUR_JITTER_NAMES:
            raise ValueError(f"unknown colour jitter {self.colour_jitter!r}; "
                             f"choose one of {', '.join(COLOUR_JITTER_NAMES)}")
        if self.epoch_images < 0:
            raise ValueError(f"epoch_images must be 0 (every image) or a positive count, not {self.epoch_images}")


def split_seed_of(options: dict) -> int:
    """The split seed a training record's options were audited with."""
    split_seed = options.get("split_seed")
    return options.get("seed", 0) if split_seed is None else split_seed
