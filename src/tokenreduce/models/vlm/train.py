"""Training the small VLM, in LLaVA's order, and loading the cached result.

1. vision pre-training (``vision_steps``): the CLIP tower alone, with a linear head on every patch token
   (:func:`~tokenreduce.models.vlm.losses.aux_loss`) predicting which digit's ink it shows, which scene
   cell it lies in, the digit's value alone and its size, so visual tokens carry *what* and *where*; the
   head is dropped afterwards.
2. visual instruction tuning (``steps``): projector + LLM + (unless ``freeze_vision``) the vision tower
   with its auxiliary loss still on, on fresh scenes every step
   (:func:`~tokenreduce.models.vlm.batches.training_batch`). Each sequence is ``<image> q answer : a </s>``
   (``prompt="image_first"``, LLaVA's layout) followed by up to ``qa_per_image - 1`` more
   ``q answer : a </s>`` turns, sometimes one of them the dense ``describe`` task; the loss is on answer
   tokens only (and ``</s>``), the mean over question types of each type's mean
   (:func:`~tokenreduce.models.vlm.losses.lm_loss`), plus word grounding and routing supervision when
   their weights are set. Cosine learning-rate schedule with warm-up.
3. with ``restart_steps`` > 0, a warm restart of phase 2 from the cached phase-2 model (its
   :meth:`~tokenreduce.models.vlm.config.VLMTrainConfig.parent`), on token-reduced images ``restart_drop``
   of the time.

The checkpoint (``model.pt``, ``config.json``, ``metrics.json`` with held-out accuracy per type) goes to
:func:`~tokenreduce.models.vlm.config.checkpoint_dir`.
"""

from __future__ import annotations

import json
import math
import platform
import time
from typing import Any

import torch

from tokenreduce.data.vqa import cell_of_patch, generate_scenes

from ..checkpoint import save_checkpoint
from ..training import torch_threads, warmup_cosine
from .batches import train_forward, training_batch
from .config import VLMTrainConfig, checkpoint_dir
from .evaluation import chance_by_type, eval_set, evaluate_vqa
from .losses import RouteProbe, aux_loss, grounding_loss, lm_loss, routing_loss
from .model import build_small_vlm, build_tokenizer
from .targets import N_AUX, N_WHAT, patch_class, patch_labels

__all__ = ["load_small_vlm", "train_small_vlm"]

_TRAIN_HINT = "build it once with `tokenreduce train vlm`"


def _cell_readout(what: torch.Tensor, scenes, c: VLMTrainConfig) -> float:
    """Fraction of digits read right from the patch classes: the most frequent non-background class among
    a cell's patches (a probe of the vision tower alone)."""
    cell = torch.from_numpy(cell_of_patch(c.scene.image_size // c.patch_size, c.scene.image_size))
    pred = what.argmax(-1)
    ok = n = 0
    for b, s in enumerate(scenes):
        for k, v in enumerate(s.digits):
            if v < 0:
                continue
            p = pred[b][cell == k]
            p = p[p != 0]
            got = int(torch.mode(p).values) if len(p) else 0
            ok += got == patch_class(k, v, k == s.small_cell)
            n += 1
    return ok / max(1, n)


@torch.no_grad()
def _vision_probe(model, aux, c: VLMTrainConfig, n: int = 200) -> dict[str, float]:
    """The vision tower alone on held-out ``val`` scenes (unseen base digits): per-patch class accuracy on
    inked patches and digits read right per cell (:func:`_cell_readout`)."""
    images, scenes, ink = generate_scenes("val", n, seed=c.eval_seed + 1, config=c.scene)
    tower = model.model.vision_tower
    was = tower.training
    tower.eval()
    what = aux(tower(images).last_hidden_state[:, 1:])[..., :N_WHAT]
    tower.train(was)
    pl = patch_labels(scenes, ink, c)
    return {"patch_acc_ink": (what.argmax(-1) == pl)[pl != 0].float().mean().item(),
            "cell_readout": _cell_readout(what, scenes, c)}


def _joint_phase(model, aux, feats: dict, tok, c: VLMTrainConfig, steps: int, lr: float, warmup: int,
                 seed_offset: int, val, history: list, progress: bool, t_offset: float, reduce: bool = False) -> float:
    """LLaVA-style joint training (answers' LM loss + the auxiliary vision loss); returns seconds spent.
    ``reduce``: token-reduction augmentation (:func:`~tokenreduce.models.vlm.batches.training_batch`)."""
    frozen = c.freeze_vision
    model.model.vision_tower.requires_grad_(not frozen)
    params = [p for p in model.parameters() if p.requires_grad] + ([] if frozen else list(aux.parameters()))
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warmup, c.min_lr_ratio))
    spent, loss_ema = 0.0, None
    type_ema: dict[str, float] = {}
    for step in range(steps):
        t0 = time.perf_counter()
        model.train()
        if frozen:  # LLaVA keeps its (pre-trained) vision encoder frozen
            model.model.vision_tower.eval()
        b = training_batch(c, seed_offset + step, tok, reduce=reduce)
        pl = b.pop("patch_labels")
        labels, types = b.pop("labels"), b.pop("answer_types")
        route = b.pop("route", None)
        probe = RouteProbe(model, c.route_layers) if route is not None else None
        projected: list[torch.Tensor] = []
        ground = model.model.multi_modal_projector.register_forward_hook(
            lambda m, a, o, keep=projected: keep.append(o)) if c.ground_weight else None
        try:
            out = train_forward(model, b)
        finally:
            if probe is not None:
                probe.remove()
            if ground is not None:
                ground.remove()
        lm_term, per_type = lm_loss(out.logits, labels, types, c.loss_per_type, c.relation_loss, c.lookup_loss)
        route_loss = routing_loss(probe, route, b["attention_mask"], c.route_head) if probe is not None else None
        if frozen:
            aux_term, loss = torch.zeros(()), lm_term
        else:
            aux_term, _ = aux_loss(aux, feats["v"][:, 1:], pl, c)
            loss = lm_term + c.aux_weight * aux_term
        if route_loss is not None:
            loss = loss + c.route_weight * route_loss
            per_type["route"] = route_loss.item()  # logged beside the types' losses
        if projected:
            ground_loss = grounding_loss(projected[0], model.get_input_embeddings().weight, pl, c)
            loss = loss + c.ground_weight * ground_loss
            per_type["ground"] = ground_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        opt.step()
        sched.step()
        spent += time.perf_counter() - t0
        loss_ema = lm_term.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * lm_term.item()
        for k, v in per_type.items():
            type_ema[k] = v if k not in type_ema else 0.95 * type_ema[k] + 0.05 * v
        if progress and (step + 1) % c.log_every == 0:
            eta = spent / (step + 1) * (steps - step - 1)
            print(f"step {seed_offset + step + 1} ({step + 1}/{steps}) lm_loss={loss_ema:.3f} aux={aux_term.item():.3f} "
                  f"lr={sched.get_last_lr()[0]:.2e} {t_offset + spent:.0f}s (eta {eta / 60:.1f} min) per type: "
                  + " ".join(f"{k}={v:.2f}" for k, v in type_ema.items()), flush=True)
        if (step + 1) % c.eval_every == 0 or step + 1 == steps:
            r = evaluate_vqa(model, tok, val)
            history.append({"step": seed_offset + step + 1, "lm_loss": loss_ema, "train_loss_by_type": dict(type_ema),
                            "val_acc": r["acc"],
                            "val_acc_by_type": r["acc_by_type"], "train_time_s": t_offset + spent})
            if progress:
                print(f"  val acc {r['acc']:.3f} " + " ".join(f"{k}={v:.2f}" for k, v in r["acc_by_type"].items()),
                      flush=True)
    return spent


def train_small_vlm(config: VLMTrainConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate (val during training, test at the end, per question type), cache, return metrics.

    With ``restart_steps > 0`` the model continues from its :meth:`~VLMTrainConfig.parent` checkpoint
    (trained first if missing) with a warm restart of the joint phase (``restart_lr``, new data).
    """
    import transformers

    c = config or VLMTrainConfig()
    with torch_threads(c.num_threads):
        t_start = time.perf_counter()
        torch.manual_seed(c.seed)
        tok = build_tokenizer()
        model = build_small_vlm(c)
        aux = torch.nn.Linear(c.vision_dim, N_AUX if c.aux_value else N_WHAT + 9)
        feats: dict[str, torch.Tensor] = {}
        hook = model.model.vision_tower.register_forward_hook(
            lambda m, a, o: feats.__setitem__("v", o.hidden_states[-1] if o.hidden_states is not None else o.last_hidden_state))
        val = eval_set("val", c)
        history: list[dict[str, Any]] = []
        train_time = 0.0
        parent = c.parent()
        vision_probe = None
        if parent is not None:
            ppath = checkpoint_dir(parent) / "model.pt"
            if not ppath.is_file():
                train_small_vlm(parent, progress=progress)
            model.load_state_dict(torch.load(ppath, map_location="cpu", weights_only=True))
            pm = json.loads(ppath.with_name("metrics.json").read_text())
            history = list(pm.get("history", []))
            vision_probe = pm.get("vision_probe")  # the tower is the parent's (frozen in the joint phase)
            train_time = float(pm.get("train_time_s", 0.0))
            train_time += _joint_phase(model, aux, feats, tok, c, c.restart_steps, c.restart_lr, 10, c.steps, val,
                                       history, progress, train_time, reduce=c.restart_drop > 0)
        else:
            # phase 1: the vision tower alone learns what/where per cell (LLaVA starts from a trained encoder)
            vparams = list(model.model.vision_tower.parameters()) + list(aux.parameters())
            vopt = torch.optim.AdamW(vparams, lr=c.vision_lr, weight_decay=c.weight_decay)
            for step in range(c.vision_steps):
                t0 = time.perf_counter()
                model.train()
                images, scenes, ink = generate_scenes("train", c.vision_batch_size, seed=c.seed * 7_000_003 + step,
                                                      config=c.scene)
                for g in vopt.param_groups:
                    g["lr"] = c.vision_lr * min(1.0, (step + 1) / c.warmup_steps) * (
                        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / c.vision_steps)))
                out = model.model.vision_tower(images, output_hidden_states=True)
                pl = patch_labels(scenes, ink, c)
                vloss, logits = aux_loss(aux, out.hidden_states[-1][:, 1:], pl, c)
                vopt.zero_grad(set_to_none=True)
                vloss.backward()
                torch.nn.utils.clip_grad_norm_(vparams, c.grad_clip)
                vopt.step()
                train_time += time.perf_counter() - t0
                if progress and (step + 1) % c.log_every == 0:
                    ink_acc = (logits.argmax(-1) == pl)[pl != 0].float().mean().item()
                    print(f"vision step {step + 1}/{c.vision_steps} loss={vloss.item():.3f} "
                          f"train patch acc (ink)={ink_acc:.3f} {train_time:.0f}s", flush=True)
            vision_probe = _vision_probe(model, aux, c)
            if progress:
                print(f"vision probe (val scenes, unseen digits): {vision_probe}", flush=True)
            # phase 2: projector + LLM (vision tower frozen unless freeze_vision=False)
            train_time += _joint_phase(model, aux, feats, tok, c, c.steps, c.lr, c.warmup_steps, 0, val, history,
                                       progress, train_time)
        hook.remove()
        test = eval_set("test", c)
        t_eval = time.perf_counter()
        r = evaluate_vqa(model, tok, test, generate=True)
        out_dir = checkpoint_dir(c)
        metrics = {
            "test_acc": r["acc"], "test_acc_by_type": r["acc_by_type"], "n_test_by_type": r["n_by_type"],
            "val_acc": history[-1]["val_acc"], "val_acc_by_type": history[-1]["val_acc_by_type"],
            "chance_by_type": chance_by_type(test), "train_time_s": train_time,
            "test_eval_time_s": time.perf_counter() - t_eval, "total_time_s": time.perf_counter() - t_start,
            "steps": c.steps + c.restart_steps, "vision_steps": c.vision_steps, "vision_probe": vision_probe,
            "sequences_seen": (c.steps + c.restart_steps) * c.batch_size, "num_threads": c.num_threads,
            "num_params": sum(p.numel() for p in model.parameters()), "history": history,
            "parent": parent.config_hash() if parent is not None else None,
            "config_hash": c.config_hash(), "checkpoint": str(out_dir),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
        }
        if c.existence:  # POPE-style questions on held-out scenes (balanced yes/no, absent digits uniform)
            ex = eval_set("test", c, types=("existence",))
            er = evaluate_vqa(model, tok, ex, generate=True)
            metrics["existence_test_acc"] = er["acc"]
            metrics["existence_yes_rate"] = er["predictions"].count("yes") / len(er["predictions"])
            metrics["existence_chance"] = chance_by_type(ex)["existence"]
        model.eval()
        save_checkpoint(out_dir, c, metrics, model)
        return metrics


def load_small_vlm(train_if_missing: bool = False, config: VLMTrainConfig | None = None, progress: bool = True,
                   attn_implementation: str = "sdpa"):
    """``(model, tokenizer, info)`` of the cached small VLM (eval mode); ``info`` has config/metrics/path.

    Raises FileNotFoundError naming the training command when no checkpoint exists.
    """
    c = config or VLMTrainConfig()
    path = checkpoint_dir(c) / "model.pt"
    if not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"no trained small VLM at {path}; {_TRAIN_HINT} (about 25-40 min on 2 shared CPU cores)")
        train_small_vlm(c, progress=progress)
    model = build_small_vlm(c, attn_implementation=attn_implementation)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    mp = path.with_name("metrics.json")
    return model, build_tokenizer(), {"config": c, "metrics": json.loads(mp.read_text()) if mp.is_file() else {},
                                      "path": path}
