"""Prompt filters (phase ``"filter"``, GemFilter): ``generate`` gets a thin wrapper that first runs the model's
own forward on the prompt up to the filter layer (the attention wrapper scores there and stops the forward by
an exception, so later layers never run on the full prompt; chunked like generate() if ``prefill_chunk_size``
is set), then calls the original ``generate`` on the kept tokens and returns the original prompt + the
continuation."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...core import kv as K
from ...methods.kv import KVContext, KVMethod
from .state import FilterRecord, question_lengths

__all__ = ["FilterDone", "FilterPass", "PromptFilter", "filtered_generate"]


class FilterDone(Exception):
    """Stops the filter pass at the filter layer (its layers after the filter layer never run)."""


@dataclass
class FilterPass:
    """The prompt filter pass in progress: filter layer, whether this chunk ends the prompt, 2D mask, scores."""

    layer: int
    final: bool
    mask2d: Tensor  # (B, L) bool, L = prompt columns up to the end of this chunk
    question_len: Tensor  # (B,)
    budget: Tensor  # (B,) prompt tokens to keep
    scores: Tensor | None = None  # (B, 1, N) once the final chunk reached the filter layer
    forced: Tensor | None = None  # (B, 1, N) tokens the method always keeps


class PromptFilter:
    """The prompt filter of one applied method: runs the filter pass (``active`` while it runs, so the attention
    wrapper hands the calls to :meth:`attention`), selects the kept tokens and records what it did."""

    def __init__(self, method: KVMethod, base: nn.Module, inner: Callable[..., Any], num_layers: int,
                 layer_types: list[str]) -> None:
        self.method, self.base, self.inner = method, base, inner
        self.config = base.config
        self.num_layers, self.layer_types = num_layers, layer_types
        self.active: FilterPass | None = None  # set while a prompt filter pass runs
        self.record = FilterRecord()

    def attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                  **kwargs: Any) -> Any:
        """The attention of the filter pass: layers before the filter layer run as usual; the filter layer of the
        final chunk scores the prompt; then the forward stops (:class:`FilterDone`)."""
        fp = self.active
        assert fp is not None
        li = module.layer_idx
        if li < fp.layer:
            return self.inner(module, query, key, value, attention_mask, **kwargs)
        if fp.final:  # the filter layer sees every prompt key: score with the last queries, then stop
            B, H, N, _ = key.shape
            dev = key.device
            pos = torch.arange(N, device=dev).view(1, 1, N).expand(B, H, N)
            valid = fp.mask2d[:, :N].view(B, 1, N).expand(B, H, N)
            first = torch.where(fp.mask2d.any(1), fp.mask2d.float().argmax(1), torch.zeros(B, device=dev)).long()
            end = torch.full((B,), N, dtype=torch.long, device=dev)
            ctx = KVContext(query=query, keys=key, pos=pos, valid=valid, qpos=torch.arange(N - query.shape[2], N,
                                                                                            device=dev),
                            rel=pos - first.view(-1, 1, 1), prompt_end=end, question_start=end - fp.question_len,
                            scaling=float(kwargs.get("scaling") or module.scaling), layer=li,
                            num_layers=self.num_layers, window=getattr(module, "sliding_window", None),
                            softcap=kwargs.get("softcap"), is_prefill=True, budget=fp.budget,
                            natural=fp.mask2d.sum(1))
            fp.scores = self.method.score(ctx)
            fp.forced = self.method.forced(ctx) & valid[:, :1]
        raise FilterDone

    def filter_prompt(self, input_ids: Tensor, attention_mask: Tensor | None, chunk: int | None
                      ) -> tuple[Tensor, Tensor]:
        """GemFilter's selection: the model's forward up to the filter layer (chunked if ``chunk``), the method's
        scores there, its top-``keep`` per sample (its forced tokens included) in positional order. Returns the kept
        ids and their mask, left-padded like the input (pad id 0 under mask 0)."""
        method = self.method
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"{method.name} filters input_ids (batch, length); got "
                             f"{None if input_ids is None else tuple(input_ids.shape)} (inputs_embeds are not supported)")
        B, N = input_ids.shape
        dev = input_ids.device
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        ql = method.question_len
        qlt = question_lengths(ql, B, dev)
        n_real = mask.sum(1)
        if bool((qlt >= n_real).any()):
            raise ValueError(f"question_len={ql} leaves no context to filter in a prompt of {int(n_real.min())} "
                             f"real tokens")
        layer = method.filter_layer(self.layer_types)  # type: ignore[attr-defined]
        budget = method.layer_budget(layer, self.num_layers, n_real, qlt)
        t0 = time.perf_counter()
        fp = self._run_pass(input_ids, mask, chunk, FilterPass(layer, False, mask, qlt, budget))
        assert fp.scores is not None and fp.forced is not None
        n_forced = fp.forced.sum(-1).view(-1)
        if bool((n_forced > budget).any()):
            b, k = int(budget[n_forced > budget].min()), int(n_forced.max())
            least = (f"keep >= {k / int(n_real.max()):.3g}" if isinstance(method.keep, float)
                     else f"tr.Keep(count={k}) or more")
            raise ValueError(f"{method.name}: {method.keep_desc(layer, self.num_layers)} leaves {b} prompt tokens, "
                             f"fewer than {method.forced_desc()} ({k} tokens); accepted: {least} or a shorter "
                             f"question_len")
        rec = self.record
        rec.notes = []
        if bool((budget >= n_real).any()):
            rec.notes.append(f"{method.name}: {method.keep_desc(layer, self.num_layers)} is at least the "
                             f"{int(n_real[budget >= n_real].max())} prompt tokens of a sample: nothing filtered there")
        idx, ok = K.select_in_order(fp.scores, mask.view(B, 1, N), fp.forced, budget.view(B, 1))
        idx, ok = idx[:, 0], ok[:, 0]
        Kmax = idx.shape[1]
        # left-pad: the n_ok valid slots (first, in order) move to the end of the row
        src = torch.arange(Kmax, device=dev).view(1, -1) - (Kmax - ok.sum(1, keepdim=True))
        keep_slot = src >= 0
        gathered = idx.gather(1, src.clamp(min=0))
        new_ids = torch.where(keep_slot, input_ids.gather(1, gathered), torch.zeros_like(gathered))
        rec.removed = N - Kmax
        rec.kept = [idx[b][ok[b]].tolist() for b in range(B)]
        rec.prompt = n_real.tolist()
        rec.seconds = time.perf_counter() - t0
        return new_ids, keep_slot.long()

    def _run_pass(self, input_ids: Tensor, mask: Tensor, chunk: int | None, fp: FilterPass) -> FilterPass:
        """The model's own forward over the prompt, stopped at the filter layer (:class:`FilterDone`) in every
        chunk; the final chunk's filter layer sees every prompt key and scores them (:meth:`attention`)."""
        from transformers import DynamicCache

        N = input_ids.shape[1]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() builds them
        cache = DynamicCache(config=self.config)
        step = N if not chunk else int(chunk)
        try:
            with torch.inference_mode():
                for s in range(0, N, step):
                    e = min(N, s + step)
                    fp.final, fp.mask2d = e == N, mask[:, :e]
                    self.active = fp
                    try:
                        self.base(input_ids=input_ids[:, s:e], attention_mask=mask[:, :e].long(),
                                  position_ids=position_ids[:, s:e], past_key_values=cache, use_cache=True)
                    except FilterDone:
                        pass
        finally:
            self.active = None
        if fp.scores is None or fp.scores.shape[-1] != N:
            raise RuntimeError(f"{self.method.name}: the filter layer {fp.layer} did not score the prompt")
        return fp


def filtered_generate(pf: PromptFilter, name: str, generate: Callable[..., Any]) -> Callable[..., Any]:
    """``model.generate`` behind a prompt filter: select, generate on the kept tokens, return the *original*
    prompt followed by the continuation (what the unpatched ``generate`` returns)."""

    def filtered(model: nn.Module, inputs: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(f"{name} filters input_ids; generate(inputs_embeds=...) is not supported")
        if kwargs.get("past_key_values") is not None:
            raise ValueError(f"{name} filters a fresh prompt; generate(past_key_values=...) is not supported")
        if pf.method.is_identity:  # keep=1: nothing to filter, no filter pass
            return generate(ids, *args, **kwargs)
        gen_cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        chunk = kwargs.get("prefill_chunk_size", getattr(gen_cfg, "prefill_chunk_size", None))
        new_ids, new_mask = pf.filter_prompt(ids, kwargs.pop("attention_mask", None), chunk)
        pf.record.in_generate = True
        try:
            out = generate(new_ids, *args, attention_mask=new_mask, **kwargs)
        finally:
            pf.record.removed, pf.record.in_generate = 0, False  # later plain forwards are not filtered
        cut = new_ids.shape[1]
        seqs = out if isinstance(out, Tensor) else out.sequences
        prompt = ids.repeat_interleave(seqs.shape[0] // ids.shape[0], dim=0)  # num_return_sequences / beams
        seqs = torch.cat([prompt, seqs[:, cut:]], dim=1)
        if isinstance(out, Tensor):
            return seqs
        out.sequences = seqs
        return out

    return filtered
