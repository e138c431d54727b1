"""ViT adapter: places a :class:`~tokenreduce.methods.vision.VisionMethod` inside the blocks of
timm ``VisionTransformer`` and transformers ``ViTModel``/``ViTForImageClassification``/``CLIPVisionModel``.

How (the ToMe recipe, Bolya et al. 2023, ``tome/patch/timm.py``, without copying whole forwards):

* each block's ``forward`` is replaced by an instance attribute that runs the block's own submodules as
  ``x = x + attn(norm1(x)); <reduce>; x = x + mlp(norm2(x))`` (the family's 2-line residual split below);
* proportional attention (log size) and padding masks enter as the additive ``attn_mask`` the block's
  own attention already accepts, so SDPA and eager both keep working;
* the attention-derived context a method needs (keys averaged over heads, the CLS attention row) comes
  from forward hooks on the q/k projections, only at the blocks where the method reduces: the CLS row
  costs one extra 1xN attention row, the model is never switched to eager attention.

``Handle.remove()`` deletes the instance attributes and hooks: the model is exactly as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import strategies as S
from ..core.state import TokenState, check_finite
from .base import Handle, Patcher, Stats, register_adapter

__all__ = ["FAMILIES", "VitAdapter", "VitFamily"]


@dataclass(frozen=True)
class QK:
    """Where a block's queries/keys come from: hooks on these modules + head geometry."""

    q_module: nn.Module
    k_module: nn.Module
    q_slice: slice | None  # for fused qkv projections
    k_slice: slice | None
    heads: int
    head_dim: int
    scale: float
    q_norm: Callable[[Tensor], Tensor] | None = None
    k_norm: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class VitFamily:
    """One model family: how to find its blocks and how its blocks split into attention and MLP halves."""

    name: str
    matches: Callable[[nn.Module], bool]
    blocks: Callable[[nn.Module], list[nn.Module]]
    protected: Callable[[nn.Module], int]
    grid: Callable[[nn.Module], tuple[int, int] | None]
    attn_half: Callable[[nn.Module, Tensor, Tensor | None, dict], Tensor]
    mlp_half: Callable[[nn.Module, Tensor], Tensor]
    qk: Callable[[nn.Module], QK]
    mask_kw: str  # name of the block's attention-mask argument
    # For families whose inputs carry padding (text encoders): derive the (B, N) padding mask from the
    # attention mask block 0 receives; the adapter then replaces the model's mask by its own bias.
    padding_mask: Callable[[Tensor | None, Tensor], Tensor | None] | None = None


# ---------------------------------------------------------------------------- timm
def _timm_vit_cls() -> type | None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return VisionTransformer


def _timm_matches(m: nn.Module) -> bool:
    cls = _timm_vit_cls()
    return cls is not None and isinstance(m, cls)


def _timm_blocks(m: nn.Module) -> list[nn.Module]:
    blocks = list(m.blocks)
    for i, b in enumerate(blocks):
        if not all(hasattr(b, a) for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2")) or not hasattr(
                b.attn, "qkv"):
            raise TypeError(
                f"timm block {i} is a {type(b).__name__} with {type(b.attn).__name__}: tokenreduce supports timm's "
                f"pre-norm Block with a fused-qkv Attention (vit_*, deit_*)"
            )
    if getattr(m, "attn_pool", None) is not None:
        raise TypeError("timm VisionTransformer with attention pooling (global_pool='map') is not supported")
    return blocks


def _timm_grid(m: nn.Module) -> tuple[int, int] | None:
    if getattr(m.patch_embed, "dynamic_img_size", False):
        return None
    g = getattr(m.patch_embed, "grid_size", None)
    return tuple(g) if g is not None else None


def _timm_attn_half(b: nn.Module, x: Tensor, bias: Tensor | None, kw: dict) -> Tensor:
    return x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=bias)))


def _timm_mlp_half(b: nn.Module, x: Tensor) -> Tensor:
    return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def _timm_qk(b: nn.Module) -> QK:
    a = b.attn
    hd = a.num_heads * a.head_dim
    return QK(a.qkv, a.qkv, slice(0, hd), slice(hd, 2 * hd), a.num_heads, a.head_dim, a.scale, a.q_norm, a.k_norm)


TIMM = VitFamily("timm VisionTransformer (vit_*, deit_*)", _timm_matches, _timm_blocks,
                 lambda m: int(m.num_prefix_tokens), _timm_grid, _timm_attn_half, _timm_mlp_half, _timm_qk,
                 "attn_mask")


# ---------------------------------------------------------------------------- transformers ViT / CLIP vision
def _hf_encoder_layers(m: nn.Module, layer_cls_name: str) -> list[nn.Module] | None:
    for mod in m.modules():
        for attr in ("layers", "layer"):  # transformers 5 uses `layers`, older releases `encoder.layer`
            layers = mod.__dict__.get("_modules", {}).get(attr)
            if isinstance(layers, nn.ModuleList) and len(layers) and type(layers[0]).__name__ == layer_cls_name:
                return list(layers)
    return None


def _hf_vit_matches(m: nn.Module) -> bool:
    return type(m).__name__ in ("ViTModel", "ViTForImageClassification") and \
        _hf_encoder_layers(m, "ViTLayer") is not None


def _hf_grid(m: nn.Module) -> tuple[int, int] | None:
    cfg = getattr(m, "config", None)
    cfg = getattr(cfg, "vision_config", cfg)
    size, patch = cfg.image_size, cfg.patch_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return size[0] // patch[0], size[1] // patch[1]


def _hf_vit_attn_half(b: nn.Module, x: Tensor, bias: Tensor | None, kw: dict) -> Tensor:
    h, _ = b.attention(b.layernorm_before(x), bias, **kw)
    return b.dropout(h) + x


def _hf_vit_mlp_half(b: nn.Module, x: Tensor) -> Tensor:
    return b.dropout(b.mlp(b.layernorm_after(x))) + x


def _hf_vit_qk(b: nn.Module) -> QK:
    a = b.attention
    return QK(a.q_proj, a.k_proj, None, None, a.num_attention_heads, a.head_dim, a.scaling)


HF_VIT = VitFamily("transformers ViTModel / ViTForImageClassification", _hf_vit_matches,
                   lambda m: _hf_encoder_layers(m, "ViTLayer"), lambda m: 1, _hf_grid,
                   _hf_vit_attn_half, _hf_vit_mlp_half, _hf_vit_qk, "attention_mask")


def _clip_matches(m: nn.Module) -> bool:
    return type(m).__name__ in ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPVisionTransformer") and \
        _hf_encoder_layers(m, "CLIPEncoderLayer") is not None


def _clip_attn_half(b: nn.Module, x: Tensor, bias: Tensor | None, kw: dict) -> Tensor:
    h, _ = b.self_attn(hidden_states=b.layer_norm1(x), attention_mask=bias, **kw)
    return x + h


def _clip_mlp_half(b: nn.Module, x: Tensor) -> Tensor:
    return x + b.mlp(b.layer_norm2(x))


def _clip_qk(b: nn.Module) -> QK:
    a = b.self_attn
    return QK(a.q_proj, a.k_proj, None, None, a.num_heads, a.head_dim, a.scale)


HF_CLIP = VitFamily("transformers CLIPVisionModel", _clip_matches, lambda m: _hf_encoder_layers(m, "CLIPEncoderLayer"),
                    lambda m: 1, _hf_grid, _clip_attn_half, _clip_mlp_half, _clip_qk, "attention_mask")

FAMILIES = [TIMM, HF_VIT, HF_CLIP]


# ---------------------------------------------------------------------------- runtime
class _Run:
    """Per-model runtime: the TokenState carried across blocks during one forward, captures, stats."""

    def __init__(self, method: Any, name: str, family: VitFamily, blocks: list[nn.Module], protected: int,
                 grid: tuple[int, int] | None) -> None:
        self.method, self.name, self.family, self.blocks = method, name, family, blocks
        self.protected, self.grid = protected, grid
        self.depth = len(blocks)
        self.state: TokenState | None = None
        self.captured: dict[str, Tensor] = {}
        self._bias: Tensor | None = None
        self._bias_valid = False
        self._stats = Stats(method=name)
        self._cur = Stats(method=name)
        self.dims: Any = None  # tokenreduce.accounting.flops.ViTDims for the FLOPs estimate in stats

    # -- forward bookkeeping
    def begin(self, x: Tensor, mask: Tensor | None = None) -> None:
        check_finite(x, "block-0 input")
        self.state = TokenState.from_tensor(x, mask=mask, protected=self.protected,
                                            grid=self.grid if self.grid and self.grid[0] * self.grid[1] + self.protected == x.shape[1] else None,
                                            check=False)
        self._bias_valid = False
        self._cur = Stats(method=self.name, input_tokens=x.shape[1])
        self.method.notes = self._cur.notes

    def bias(self, dtype: torch.dtype) -> Tensor | None:
        """Additive attention bias (B,1,1,N): log(size) if proportional attention, dtype-min on padding."""
        if self._bias_valid:
            return self._bias
        st = self.state
        assert st is not None
        pad = not bool(st.mask.all())
        prop = self.method.prop_attn and bool((st.size != 1).any())
        if not pad and not prop:
            b = None
        else:
            neg = torch.finfo(dtype).min
            b = torch.zeros(st.size.shape, dtype=dtype, device=st.size.device)
            if prop:
                b = torch.log(st.size.clamp(min=1e-6)).to(dtype)
            b = b.masked_fill(~st.mask, neg)[:, None, None, :]
        self._bias, self._bias_valid = b, True
        return b

    def context(self, layer: int, qk: QK, bias: Tensor | None) -> dict[str, Tensor]:
        needs = self.method.needs
        if not needs:
            return {}
        q_out, k_out = self.captured.pop("q"), self.captured.pop("k")
        B, N, _ = k_out.shape
        H, hd = qk.heads, qk.head_dim
        kf = k_out if qk.k_slice is None else k_out[..., qk.k_slice]  # (B, N, H*d), maybe a strided view
        k_norm = None if qk.k_norm is None or isinstance(qk.k_norm, nn.Identity) else qk.k_norm
        ctx: dict[str, Tensor] = {}
        if k_norm is not None:
            k = k_norm(kf.reshape(B, N, H, hd))  # per-head norm over head_dim
            if "metric" in needs:
                ctx["metric"] = k.mean(2)
        else:
            k = kf.reshape(B, N, H, hd)  # a view (splits the last dim)
            if "metric" in needs:
                # ToMe's metric, keys averaged over heads, as a sum of H column slices (a mean over the head
                # dim of the strided qkv output is ~5x slower on CPU); the 1/H factor is left out: every
                # consumer is scale-invariant (cosine similarity, max-min distances)
                m = kf[..., :hd]
                for h in range(1, H):
                    m = m + kf[..., h * hd:(h + 1) * hd]
                ctx["metric"] = m
        k = k.transpose(1, 2)  # (B, H, N, d)
        if "cls_attn" in needs:
            q0 = (q_out[:, :1] if qk.q_slice is None else q_out[:, :1, qk.q_slice]).reshape(B, 1, qk.heads, qk.head_dim)
            q0 = q0.transpose(1, 2)
            if qk.q_norm is not None:
                q0 = qk.q_norm(q0)
            logits = (q0 * qk.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
            if bias is not None:
                logits = logits + bias
            ctx["cls_attn"] = logits.float().softmax(-1)[:, :, 0].mean(1)
        return ctx

    def stats(self) -> Stats:
        return self._stats

    def unmerge(self, y: Tensor) -> Tensor:
        if self.state is None:
            raise RuntimeError("no forward pass has run yet")
        out, _ = S.unmerge(self.state, y)
        return out


def _make_forward(run: _Run, layer: int, qk: QK) -> Callable[..., Tensor]:
    fam = run.family
    method = run.method

    def forward(block: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        user_mask = kwargs.pop(fam.mask_kw, args[0] if args else None)
        if kwargs.pop("is_causal", False):
            raise ValueError("tokenreduce ViT methods do not support is_causal=True")
        if layer == 0:
            run.begin(x, None if fam.padding_mask is None else fam.padding_mask(user_mask, x))
        if fam.padding_mask is not None:
            user_mask = None  # the state's mask (in the bias) carries the padding from here on
        st = run.state
        if st is None or st.x.shape[:2] != x.shape[:2] and layer != 0:
            raise RuntimeError(f"block {layer} got {tuple(x.shape)} but the reduced state has "
                               f"{None if st is None else tuple(st.x.shape)}: run the whole model, not single blocks")
        bias = run.bias(x.dtype)
        if user_mask is not None:
            bias = user_mask if bias is None else user_mask + bias
        cur = run._cur
        n_real = float(st.mask.sum(1).float().mean()) if st.mask.shape[1] else 0.0
        cur.tokens_attn.append(n_real)
        x = fam.attn_half(block, x, bias, kwargs)
        if method.reduces_at(layer):
            t0 = time.perf_counter()
            ctx = run.context(layer, qk, bias)
            new = method.reduce(layer, st.with_x(x), ctx)
            if new is not st:
                run.state, run._bias_valid = new, False
                x = new.x
            cur.reduce_seconds += time.perf_counter() - t0
        cur.tokens_mlp.append(float(run.state.mask.sum(1).float().mean()))
        x = fam.mlp_half(block, x)
        run.state = run.state.with_x(x)
        if layer == run.depth - 1:
            cur.final_tokens = run.state.mask.sum(1).tolist()
            if run.dims is not None:
                f = run.dims.flops(cur.tokens_attn, cur.tokens_mlp)
                cur.flops = {"gflops": f["gflops"], "gflops_unreduced": run.dims.flops()["gflops"]}
            run._stats = cur
        return x

    return forward


class VitAdapter:
    """Adapter for the ViT families in :data:`FAMILIES` (integration point ``vit-layers``)."""

    integration = "vit-layers"

    def __init__(self, family: VitFamily) -> None:
        self.family = family
        self.name = family.name

    def matches(self, model: nn.Module) -> bool:
        return bool(self.family.matches(model))

    def attach(self, model: nn.Module, method: Any, method_name: str) -> Handle:
        fam = self.family
        blocks = fam.blocks(model)
        method.setup(len(blocks))
        run = _Run(method, method_name, fam, blocks, fam.protected(model), fam.grid(model))
        run.dims = _dims(model, fam)
        p = Patcher()
        for i, b in enumerate(blocks):
            qk = fam.qk(b)
            p.set_method(b, "forward", _make_forward(run, i, qk))
            if method.reduces_at(i) and method.needs:
                if qk.k_module is qk.q_module:  # fused qkv projection: one hook
                    p.hook(qk.q_module.register_forward_hook(_capture(run, "q", "k")))
                else:
                    p.hook(qk.q_module.register_forward_hook(_capture(run, "q")))
                    p.hook(qk.k_module.register_forward_hook(_capture(run, "k")))
        if fam is TIMM:
            _patch_timm_pool(model, run, p)
        return Handle(model, method_name, method, p, run.stats, extras={"unmerge": run.unmerge})


def _dims(model: nn.Module, fam: VitFamily) -> Any:
    """Shapes for the analytic FLOPs estimate reported in ``Handle.stats.flops`` (None if unknown)."""
    from ..accounting.flops import hf_vit_dims, timm_vit_dims

    if fam is TIMM:
        return timm_vit_dims(model)
    cfg = getattr(model, "config", None)
    if cfg is not None and all(hasattr(getattr(cfg, "vision_config", cfg), a) for a in
                               ("hidden_size", "intermediate_size", "image_size", "patch_size")):
        return hf_vit_dims(cfg, prefix_tokens=fam.protected(model))
    return None


def _capture(run: _Run, *keys: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, out: Tensor) -> None:
        for key in keys:
            run.captured[key] = out

    return hook


def _patch_timm_pool(model: nn.Module, run: _Run, p: Patcher) -> None:
    """timm's 'avg'/'max'/'avgmax' pooling must respect padding and token sizes after reduction."""
    if model.global_pool in ("token", ""):
        return
    if model.global_pool not in ("avg", "max", "avgmax"):
        raise TypeError(f"timm global_pool={model.global_pool!r} is not supported; accepted: token, avg, max, avgmax")

    def pool(self: nn.Module, x: Tensor, pool_type: str | None = None) -> Tensor:
        pt = self.global_pool if pool_type is None else pool_type
        st = run.state
        if pt == "token" or st is None or st.x.shape[:2] != x.shape[:2]:
            return type(self).pool(self, x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        xs, w, m = x[:, start:], st.size[:, start:].to(x.dtype), st.mask[:, start:]
        avg = (xs * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-6)
        mx = xs.masked_fill(~m.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)
        return {"avg": avg, "max": mx, "avgmax": 0.5 * (avg + mx)}[pt]

    p.set_method(model, "pool", pool)


for _fam in FAMILIES:
    register_adapter(VitAdapter(_fam))
