"""Methods at the ``vit-layers`` integration point, one file each; importing the package registers them."""

from .base import VIT, StageMethod, VisionMethod, default_stage_layers
from .cluster import ClusterMerge
from .diffrate import DiffRate
from .dynamicvit import DynamicViT
from .evit import EViT
from .pool import Pool
from .random import RandomPrune
from .token_transforming import TokenTransforming
from .tome import ToMe

__all__ = ["VIT", "ClusterMerge", "DiffRate", "DynamicViT", "EViT", "Pool", "RandomPrune", "StageMethod", "ToMe",
           "TokenTransforming", "VisionMethod", "default_stage_layers"]
