"""The block-split machinery shared by the ViT and text-encoder adapters.

How (the ToMe recipe, Bolya et al. 2023, ``tome/patch/timm.py``, without copying whole forwards):

* each block's ``forward`` is replaced by an instance attribute that runs the block's own submodules as
  ``x = x + attn(norm1(x)); <reduce>; x = x + mlp(norm2(x))`` (the family's 2-line residual split, a
  :class:`BlockFamily`);
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
from .base import Handle, Patcher, Stats

__all__ = ["QK", "BlockFamily", "BlockRun", "attach_blocks", "capture_hook", "hf_encoder_layers",
           "make_block_forward"]


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
class BlockFamily:
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


def hf_encoder_layers(m: nn.Module, layer_cls_name: str) -> list[nn.Module] | None:
    """The first ``layers``/``layer`` ModuleList of ``m`` whose first entry is a ``layer_cls_name``."""
    for mod in m.modules():
        for attr in ("layers", "layer"):  # transformers 5 uses `layers`, older releases `encoder.layer`
            layers = mod.__dict__.get("_modules", {}).get(attr)
            if isinstance(layers, nn.ModuleList) and len(layers) and type(layers[0]).__name__ == layer_cls_name:
                return list(layers)
    return None


class BlockRun:
    """Per-model runtime: the TokenState carried across blocks during one forward, captures, stats."""

    def __init__(self, method: Any, name: str, family: BlockFamily, blocks: list[nn.Module], protected: int,
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
        self.input_real = self.state.mask.sum(1)
        self._cur = Stats(method=self.name, input_tokens=x.shape[1], keep=getattr(self.method.budget, "fraction", None))
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


def make_block_forward(run: BlockRun, layer: int, qk: QK) -> Callable[..., Tensor]:
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
        n_attn = st.mask.sum(1)
        cur.tokens_attn.append(float(n_attn.float().mean()) if st.mask.shape[1] else 0.0)
        x = fam.attn_half(block, x, bias, kwargs)
        if method.reduces_at(layer):
            t0 = time.perf_counter()
            ctx = run.context(layer, qk, bias)
            new = method.reduce(layer, st.with_x(x), ctx)
            if new is not st:
                run.state, run._bias_valid = new, False
                x = new.x
            cur.reduce_seconds += time.perf_counter() - t0
        n_mlp = run.state.mask.sum(1)
        cur.tokens_mlp.append(float(n_mlp.float().mean()))
        run.work = n_attn + n_mlp if layer == 0 else run.work + n_attn + n_mlp  # per sample, both halves
        x = fam.mlp_half(block, x)
        run.state = run.state.with_x(x)
        if layer == run.depth - 1:
            cur.final_tokens = run.state.mask.sum(1).tolist()
            # the meaning of keep at vit-/encoder-layers: per sample, the tokens both halves of every block
            # processed over (2 x depth x its real input tokens), averaged over the batch
            real = run.input_real > 0  # an all-padding row processes nothing and asks for nothing
            frac = run.work.double() / (2 * run.depth * run.input_real.clamp(min=1).double())
            cur.keep_achieved = float(frac[real].mean()) if bool(real.any()) else 1.0
            if run.dims is not None:
                f = run.dims.flops(cur.tokens_attn, cur.tokens_mlp)
                cur.flops = {"gflops": f["gflops"], "gflops_unreduced": run.dims.flops()["gflops"]}
            run._stats = cur
        return x

    return forward


def capture_hook(run: BlockRun, *keys: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, out: Tensor) -> None:
        for key in keys:
            run.captured[key] = out

    return hook


def attach_blocks(model: nn.Module, method: Any, method_name: str, family: BlockFamily, grid: tuple[int, int] | None,
                  dims: Any = None) -> tuple[Handle, BlockRun, Patcher]:
    """Patch the blocks of ``model`` with ``method``: block forwards, q/k capture hooks where the method
    reduces and needs attention context. Returns the handle, the run and the patcher (for extra patches)."""
    blocks = family.blocks(model)
    if "cls_attn" in method.needs and family.protected(model) == 0:
        raise TypeError(f"{method_name} ranks tokens by the attention of the [CLS] token, and this "
                        f"{type(model).__name__} has none (no prefix token); use a method that needs no [CLS]: "
                        f"tome, cluster, pool, random")
    method.label = method_name  # the registered name, for messages
    if hasattr(method, "bind"):  # a learned method loads what was trained for this model (methods/vit/learned.py)
        method.bind(model)
    method.setup(len(blocks))
    run = BlockRun(method, method_name, family, blocks, family.protected(model), grid)
    run.dims = dims
    p = Patcher()
    for i, b in enumerate(blocks):
        qk = family.qk(b)
        p.set_method(b, "forward", make_block_forward(run, i, qk))
        if method.reduces_at(i) and method.needs:
            if qk.k_module is qk.q_module:  # fused qkv projection: one hook
                p.hook(qk.q_module.register_forward_hook(capture_hook(run, "q", "k")))
            else:
                p.hook(qk.q_module.register_forward_hook(capture_hook(run, "q")))
                p.hook(qk.k_module.register_forward_hook(capture_hook(run, "k")))
    handle = Handle(model, method_name, method, p, run.stats,
                    extras={"unmerge": run.unmerge, "state": lambda: run.state,
                            "attention_mask": lambda: None if run.state is None else run.state.mask.long()})
    return handle, run, p
