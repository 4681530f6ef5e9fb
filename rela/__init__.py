"""ReLA: the Representation Learning Accelerator (Sun, Jiang, Lin; NeurIPS 2024).

Pipeline: config -> build (data -> learner + method -> prior -> bank -> targets -> accelerator)
-> train -> evaluate; every name a user can type is in :mod:`rela.registry`.
"""

from rela.accelerator import AdaptiveSwitch, ConstantSwitch, ReLAAccelerator, rela_loss
from rela.bank import load_or_extract
from rela.callbacks import KNNMonitor, StepMetrics
from rela.config import TrainConfig
from rela.data import DynamicSubsetSampler, load_dataset
from rela.diagnose import diagnose, rank_priors
from rela.errors import RelaError
from rela.evaluate import evaluate_run
from rela.export import export_backbone
from rela.priors import Prior, build_prior
from rela.targets import Targets, transport
from rela.train import train

__version__ = "0.1.0"
__all__ = [
    "AdaptiveSwitch", "ConstantSwitch", "DynamicSubsetSampler", "KNNMonitor", "Prior", "ReLAAccelerator",
    "RelaError", "StepMetrics", "TrainConfig", "build_prior", "diagnose", "evaluate_run", "export_backbone",
    "load_dataset", "load_or_extract", "rank_priors", "Targets", "rela_loss", "train", "transport",
]
