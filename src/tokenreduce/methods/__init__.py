"""Built-in methods, one package per integration point (one file per method where the family is large);
importing this package registers them all (see ``tokenreduce.registry``)."""

from . import diffusion, encoder, kv, prompt, vit, vlm

__all__ = ["diffusion", "encoder", "kv", "prompt", "vit", "vlm"]
