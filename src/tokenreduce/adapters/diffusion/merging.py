"""Merging runtime: merge a block's tokens before an operation and unmerge after (ToMe for SD's recipe),
with forward hooks only.

Per site and forward: a pre-hook on the block reads its input (the merge metric, ToMe for SD's choice) and
asks the method for a token map; pre-hooks on the self-attention's ``to_q``/``to_k``/``to_v`` replace their
input by the merged tokens (computed once: the three share it), a hook on ``to_out[0]`` unmerges the
output, so diffusers' own attention processor, SDPA, norms and residuals run unchanged. Cross-attention
queries (``to_q``/``to_out[0]`` of ``attn2``) and the feed-forward are merged the same way when the method
says so. Keys/values-only methods (ToDo) replace the ``to_k``/``to_v`` input by their map's kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ...core.diffusion import grid_shape
from ...methods.diffusion.base import DiffusionMethod, SiteCall
from ..base import Patcher
from .runtime import Clock, Timer
from .sites import Site

__all__ = ["MergeRuntime"]


@dataclass
class _State:
    """One site during one block call: its token map (or keys/values index), the merged tensors reused by
    the projections, and whether the hooks fired."""

    map: Any = None
    kv_map: Any = None
    src: Tensor | None = None  # the to_q input the merged tensor came from
    merged: Tensor | None = None
    kv_src: Tensor | None = None
    kv: Tensor | None = None
    pending: set | None = None  # modules whose output must be unmerged

    def clear(self) -> None:
        self.map = self.kv_map = self.src = self.merged = self.kv_src = self.kv = None
        self.pending = None


class MergeRuntime:
    """Hooks of a merging (or keys/values downsampling) method on every site."""

    def __init__(self, method: DiffusionMethod, sites: list[Site], clock: Clock) -> None:
        self.method, self.sites, self.clock = method, sites, clock
        self.ops = frozenset({"attn"}) if method.kv_only else method.ops
        self.states = [_State() for _ in sites]
        self.timer = Timer(clock)

    def install(self, p: Patcher) -> None:
        for i, s in enumerate(self.sites):
            p.hook(s.block.register_forward_pre_hook(self._block_pre(i), with_kwargs=True))
            p.hook(s.block.register_forward_hook(self._block_post(i, s)))
            if "attn" in self.ops:
                if not self.method.kv_only:
                    p.hook(s.attn.to_q.register_forward_pre_hook(self._merge_pre(i, "attn")))
                    p.hook(s.attn.to_out[0].register_forward_hook(self._unmerge_post(i, "attn")))
                for proj in (s.attn.to_k, s.attn.to_v):
                    p.hook(proj.register_forward_pre_hook(self._kv_pre(i)))
            if "cross" in self.ops and s.cross is not None:
                p.hook(s.cross.to_q.register_forward_pre_hook(self._merge_pre(i, "cross")))
                p.hook(s.cross.to_out[0].register_forward_hook(self._unmerge_post(i, "cross")))
            if "mlp" in self.ops and s.ff is not None:
                p.hook(s.ff.register_forward_pre_hook(self._merge_pre(i, "mlp")))
                p.hook(s.ff.register_forward_hook(self._unmerge_post(i, "mlp")))

    # ------------------------------------------------------------------ block: build the map
    def _block_pre(self, i: int) -> Any:
        site = self.sites[i]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            st = self.states[i]
            st.clear()
            x = args[0] if args else kwargs["hidden_states"]
            clock, stats = self.clock, self.clock.stats
            if x.dim() == 4:  # a plain attention block over a feature map
                n, (h, w) = x.shape[2] * x.shape[3], tuple(x.shape[2:])
                d = grid_shape(n, clock.n0, clock.h0, clock.w0)[0]
                metric = x.flatten(2).transpose(1, 2)
            else:
                n = x.shape[1]
                d, h, w = grid_shape(n, clock.n0, clock.h0, clock.w0)
                metric = x
            stats.site_tokens[i] = n
            stats.tokens_attn[i] = stats.tokens_kv[i] = float(n)
            stats.tokens_mlp[i] = float(n) if site.ff is not None else 0.0
            if clock.keep >= 1.0 or d > self.method.max_downsample:
                return
            if h * w != n:
                stats.notes.append(f"{site.name}: {n} tokens do not form the {h}x{w} grid of its level; not reduced")
                return
            if kwargs.get("attention_mask") is not None:
                raise ValueError(f"{site.name}: token reduction of self-attention with an attention_mask is not "
                                 f"supported")
            stats.reduced[i] = True
            call = SiteCall(i, len(self.sites), site.name, (h, w), d, clock.t, clock.step, clock.run, clock.tick)
            with self.timer:
                if self.method.kv_only:
                    st.kv_map = self.method.kv_map(call, clock.keep, x.device)
                    stats.tokens_kv[i] = float(st.kv_map.kept)
                    st.pending = set()
                    return
                st.map = self.method.map_for(call, metric, clock.keep)
            k = float(st.map.kept)
            stats.tokens_attn[i] = stats.tokens_kv[i] = k if "attn" in self.ops else float(n)
            if "mlp" in self.ops and site.ff is not None:
                stats.tokens_mlp[i] = k
            st.pending = set()

        return hook

    def _block_post(self, i: int, site: Site) -> Any:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            st = self.states[i]
            if st.pending is not None and "attn" in self.ops and "attn" not in st.pending:
                raise RuntimeError(f"{site.name}: the attention processor {type(site.attn.processor).__name__} did "
                                   f"not call to_q/to_k/to_v: tokens were not reduced")
            st.clear()

        return hook

    # ------------------------------------------------------------------ operations
    def _merge_pre(self, i: int, op: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            st = self.states[i]
            if st.map is None:
                return None
            with self.timer:
                merged = st.map.merge(args[0])
            if op == "attn":
                st.src, st.merged = args[0], merged
            st.pending.add(op)
            return (merged, *args[1:])

        return hook

    def _kv_pre(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            st = self.states[i]
            x = args[0]
            if st.kv_map is not None:
                if x is not st.kv_src:
                    with self.timer:
                        st.kv_src, st.kv = x, st.kv_map.merge(x)
                    st.pending.add("attn")
                return (st.kv, *args[1:])
            if st.merged is not None and x is st.src:
                return (st.merged, *args[1:])
            return None

        return hook

    def _unmerge_post(self, i: int, op: str) -> Any:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            st = self.states[i]
            if st.map is None or op not in st.pending:
                return None
            if op == "attn":
                st.src = st.merged = None
            with self.timer:
                return st.map.unmerge(out)

        return hook
