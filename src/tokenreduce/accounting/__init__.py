"""Efficiency accounting shared by the adapters (``Handle.stats``) and the benchmarks: analytic FLOPs from
real kept-token counts, KV-cache bytes of the real tensors, exact peak tensor memory. Depends on nothing
else of the package, so both layers above can use it."""

from .flops import (
           BLOCK_PARTS,
           ViTDims,
           block_flops,
           flops_speedup,
           hf_vit_dims,
           timm_vit_dims,
           vit_flops,
           vlm_prefill_flops,
)
from .kv import kv_bytes
from .memory import MemoryTracker, peak_memory

__all__ = ["BLOCK_PARTS", "MemoryTracker", "ViTDims", "block_flops", "flops_speedup", "hf_vit_dims", "kv_bytes",
           "peak_memory", "timm_vit_dims", "vit_flops", "vlm_prefill_flops"]
