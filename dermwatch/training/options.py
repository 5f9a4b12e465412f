"""What a training run is asked to do. Free of TensorFlow, so the CLI can show the defaults."""

from __future__ import annotations

from dataclasses import dataclass

from dermwatch.preprocess import COLOUR_MODES, CROP_MODES
from dermwatch.training.model_names import ARCHITECTURES

#: How far augmentation moves colours (data.COLOUR_JITTERS holds what each name means).
COLOUR_JITTER_NAMES = ("mild", "strong")
#: How far augmentation zooms (data.ZOOM_RANGES holds what each name means).
ZOOM_NAMES = ("mild", "strong")
BALANCE_MODES = ("weights", "class-and-source", "logit-adjust", "none")


@dataclass(frozen=True)
class TrainOptions:
    """One network's recipe. The defaults are the shipped model's: EfficientNet-Lite0 from its
    ImageNet weights, fine-tuned whole at 128 px for 30 epochs of 6,784 images drawn evenly over
    classes and, within a class, over data roots; AdamW with 3 warm-up epochs then cosine decay,
    label smoothing 0.1 and an EMA of the weights (issue 21's recipe)."""

    arch: str = "efficientnet-lite0"  # model.ARCHITECTURES; the CLI calls it --backbone
    input_size: int = 128
    width: int = 32  # dermnet only: filters of its first stage
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    # How class imbalance is handled: "weights" weights the loss by inverse class frequency;
    # "logit-adjust" trains on the data as it is and subtracts log(class prior) from the
    # logits afterwards (Menon et al., 2021), which targets balanced error; "class-and-source"
    # also weighs each data root equally within a class, so the root is no cue to the class;
    # "none" does neither.
    balance: str = "class-and-source"
    augment: bool = True  # flips, rotations, affine and colour jitter on the fly
    colour_jitter: str = "mild"  # COLOUR_JITTER_NAMES: how far augmentation moves colours
    zoom: str = "strong"  # ZOOM_NAMES: "strong" also shows lesions magnified up to 2x, as tight crops frame them
    schedule: str = "cosine"  # cosine: AdamW, warm-up then cosine decay; constant: plain Adam
    warmup_epochs: float = 3.0  # cosine only: epochs of linear warm-up before the decay
    label_smoothing: float = 0.1
    keep_best: bool = True  # restore the best validation epoch; False keeps the last one
    ema: bool = True  # score and keep an exponential moving average of the weights (cosine only)
    ema_momentum: float = 0.999
    colour: str = "as-is"  # preprocess.COLOUR_MODES: "shades-of-grey" removes each image's colour cast
    crop: str = "whole-frame"  # preprocess.CROP_MODES: "lesion" cuts each image to the square around its lesion
    # 0: every training image once per epoch, balanced by loss weights. N: each epoch draws N
    # images, each as likely as the balance mode weighs it (data.epoch_draws), loss unweighted.
    epoch_images: int = 6784
    # The seed the lesion-grouped split was drawn with, when not ``seed`` (members of a seed
    # ensemble share one split). Recorded so `evaluate` can draw the same split again.
    split_seed: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"unknown balance mode {self.balance!r}; choose one of {', '.join(BALANCE_MODES)}")
        if self.colour not in COLOUR_MODES:
            raise ValueError(f"unknown colour mode {self.colour!r}; choose one of {', '.join(COLOUR_MODES)}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"unknown crop mode {self.crop!r}; choose one of {', '.join(CROP_MODES)}")
        if self.colour_jitter not in COLOUR_JITTER_NAMES:
            raise ValueError(f"unknown colour jitter {self.colour_jitter!r}; "
                             f"choose one of {', '.join(COLOUR_JITTER_NAMES)}")
        if self.zoom not in ZOOM_NAMES:
            raise ValueError(f"unknown zoom {self.zoom!r}; choose one of {', '.join(ZOOM_NAMES)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.epoch_images < 0:
            raise ValueError(f"epoch_images must be 0 (every image) or a positive count, not {self.epoch_images}")


def split_seed_of(options: dict) -> int:
    """The split seed a training record's options were audited with."""
    split_seed = options.get("split_seed")
    return options.get("seed", 0) if split_seed is None else split_seed
