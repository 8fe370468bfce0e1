"""Stage two of VTA-SAM: the latent diffusion model, its training loop and sampling."""

from train.config import PRESETS, TrainConfig, route
from train.diffusion import sample
from train.model import VTASAM
from train.trainer import load_model

__all__ = ["PRESETS", "VTASAM", "TrainConfig", "load_model", "route", "sample"]
