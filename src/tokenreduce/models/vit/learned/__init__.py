"""Training the learned vision methods on a frozen timm ViT: DynamicViT's prediction modules
(:mod:`.dynamicvit`), DiffRate's compression rates (:mod:`.diffrate`), their masked training forward
(:mod:`.forward`) and the driver that caches what ``tr.apply`` loads (:mod:`.train`)."""

from .train import LEARNED, LearnedConfig, learned_dir, train_learned, train_learned_reference

__all__ = ["LEARNED", "LearnedConfig", "learned_dir", "train_learned", "train_learned_reference"]
