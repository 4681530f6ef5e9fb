"""ReLA: the Representation Learning Accelerator (Sun, Jiang, Lin; NeurIPS 2024).

Pipeline: data -> priors -> bank -> accelerator -> methods -> train -> evaluate.
"""

from rela.accelerator import AdaptiveSwitch, ConstantSwitch, ReLAAccelerator, rela_loss
from rela.bank import load_or_extract, transport
from rela.config import TrainConfig
from rela.data import DynamicSubsetSampler, load_dataset
from rela.diagnose import diagnose, rank_priors
from rela.errors import RelaError
from rela.evaluate import evaluate_run
from rela.priors import Prior, build_prior
from rela.train import train

__version__ = "0.1.0"
__all__ = [
    "AdaptiveSwitch", "ConstantSwitch", "DynamicSubsetSampler", "Prior", "ReLAAccelerator", "RelaError",
    "TrainConfig", "build_prior", "diagnose", "evaluate_run", "load_dataset", "load_or_extract", "rank_priors",
    "rela_loss", "train", "transport",
]
