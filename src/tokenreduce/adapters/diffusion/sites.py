"""Where the diffusion methods act inside diffusers denoisers: the "sites" (one per transformer block or
plain attention block) and the model's finest token grid.

Supported denoisers: :data:`SUPPORTED`. A site is

* a ``BasicTransformerBlock`` (Stable Diffusion's UNet transformer blocks, DiT blocks): its input is the
  block's tokens (B, N, C); self-attention ``attn1``, cross-attention ``attn2`` (if any), feed-forward ``ff``;
* a plain ``Attention`` over a feature map (``UNet2DModel``'s attention blocks): input (B, C, H, W), its own
  group norm and residual inside the attention processor.

Tokens are reduced at the attention's own projections (``to_q``/``to_k``/``to_v`` inputs, ``to_out[0]``
output), so the model's attention processor, SDPA and residuals run unchanged; that needs a processor that
calls them (diffusers' ``AttnProcessor2_0`` / ``AttnProcessor``) and unfused projections.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["SUPPORTED", "Site", "find_sites", "is_diffusers", "patch_size"]

SUPPORTED = ("UNet2DConditionModel", "UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel")
PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # execution order (mid_block registers last)


@dataclass(frozen=True)
class Site:
    """One reducing place: ``block`` (its input is the merge metric), its self-attention ``attn``,
    cross-attention ``cross`` and feed-forward ``ff`` (None for a plain attention block)."""

    name: str
    block: nn.Module
    attn: nn.Module
    cross: nn.Module | None
    ff: nn.Module | None


def is_diffusers(model: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] == "diffusers" for c in type(model).__mro__)


def _supported_class(model: nn.Module) -> str:
    import diffusers

    for name in SUPPORTED:
        if isinstance(model, getattr(diffusers, name)):
            return name
    raise TypeError(f"unsupported denoiser {type(model).__name__}: tokenreduce's diffusion adapter supports "
                    f"diffusers {', '.join(SUPPORTED)} (pass pipe.unet / pipe.transformer)")


def patch_size(model: nn.Module) -> int:
    """Pixels per token side at the finest token grid (DiT / patched Transformer2DModel: the patch size)."""
    return int(getattr(model.config, "patch_size", None) or 1)


def _check_attention(name: str, attn: nn.Module) -> None:
    proc = type(attn.processor).__name__
    fused = bool(getattr(attn, "fused_projections", False))
    if proc not in PROCESSORS or fused:
        raise TypeError(f"{name}: attention processor {proc}{' with fused projections' if fused else ''}"
                        f" is not supported: tokens are reduced at to_q/to_k/to_v/to_out, which diffusers' "
                        f"{' / '.join(PROCESSORS)} call (attn.set_processor(AttnProcessor2_0()); unfuse_qkv_projections())")


def find_sites(model: nn.Module) -> list[Site]:
    """The sites of a supported denoiser in execution order (down, mid, up), or a TypeError."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention

    cls = _supported_class(model)
    if cls == "Transformer2DModel" and getattr(model, "is_input_vectorized", False):
        raise TypeError("Transformer2DModel with discrete (vectorized) inputs is not supported: no spatial token grid")
    sites: list[Site] = []
    inside: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, BasicTransformerBlock):
            inside.update(id(x) for x in m.modules())
            if m.only_cross_attention:
                continue
            cross = m.attn2 if m.attn2 is not None and m.attn2.is_cross_attention else None
            sites.append(Site(name, m, m.attn1, cross, m.ff))
        elif isinstance(m, Attention) and id(m) not in inside and not m.is_cross_attention:
            sites.append(Site(name, m, m, None, None))
    if not sites:
        raise TypeError(f"{cls} has no self-attention block: nothing for token reduction to act on")
    for s in sites:
        _check_attention(s.name, s.attn)
        if s.cross is not None:
            _check_attention(s.name, s.cross)
    return sorted(sites, key=lambda s: _ORDER.get(s.name.split(".")[0], 0))
