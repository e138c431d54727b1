"""What the small VLM is trained to produce, besides the answers themselves: the text of a turn's target
(rationales), per-patch class labels of a scene (for the auxiliary vision loss and word grounding), the
cells each answer word must look at (routing supervision), and the tags that split the LM loss by kind."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenreduce.data.vqa import POSITION_NAMES, QA, QUESTION_TYPES, cell_of_patch

from .config import VLMTrainConfig

__all__ = ["EXISTENCE_FORMS", "EXISTENCE_LOOKUP_TOKENS", "EXISTENCE_NEW_TOKENS", "LOOKUP", "LOSS_TYPES", "N_AUX",
           "N_WHAT", "RATIONALE_NEW_TOKENS", "RELATION", "axis_rationale", "lookup_rationale", "ordered_description",
           "patch_class", "patch_labels", "patch_value", "rationale_tokens", "routing_targets", "training_target"]


#: per-patch class: 0 background, 1 + 10 * cell + d regular digit d in scene cell ``cell`` (what and where
#: conjoined), 91 + d small digit d
N_WHAT = 101
#: auxiliary head outputs: what (101) | where (9 cells) | value (bg + 10 digits, shared by regular and small
#: digits) | size (bg, regular, small)
N_AUX = N_WHAT + 9 + 11 + 3


def patch_class(cell: int, value: int, small: bool) -> int:
    return 91 + value if small else 1 + 10 * cell + value


def patch_value(labels: torch.Tensor) -> torch.Tensor:
    """The digit value (0-9) of each patch class of :func:`patch_class`, regular or small alike
    (meaningless where the class is 0, background)."""
    return torch.where(labels >= 91, labels - 91, (labels - 1) % 10)


def patch_labels(scenes, ink: torch.Tensor, c: VLMTrainConfig) -> torch.Tensor:
    """(n, P) class of each patch (:func:`patch_class`): the digit whose ink covers more than
    ``ink_threshold`` of the patch, conjoined with its scene cell for regular digits, else 0 (background)."""
    g = c.scene.image_size // c.patch_size
    cell = torch.from_numpy(cell_of_patch(g, c.scene.image_size))
    per_cell = torch.tensor([[0 if v < 0 else patch_class(k, v, k == s.small_cell) for k, v in enumerate(s.digits)]
                             for s in scenes])[:, cell]
    frac = F.avg_pool2d(ink[:, None].float(), c.patch_size)[:, 0].flatten(1)
    return torch.where(frac > c.ink_threshold, per_cell, torch.zeros_like(per_cell))


_AXIS_WORDS = {"col": ("left", "center", "right"), "row": ("top", "center", "bottom")}


def axis_rationale(qa: QA) -> str:
    """A spatial rationale on the relation's axis only: ``3 top left , 7 center`` for ``is the 3 left of
    the 7 ?`` -> ``3 left , 7 center`` (columns); for above/below the rows (``3 top , 7 center``)."""
    horizontal = " left of " in qa.question or " right of " in qa.question
    out = []
    for part in qa.rationale.split(" , "):
        digit, name = part.split(" ", 1)
        row, col = divmod(POSITION_NAMES.index(name), 3)
        out.append(f"{digit} {_AXIS_WORDS['col'][col] if horizontal else _AXIS_WORDS['row'][row]}")
    return " , ".join(out)


#: what a model writes for an existence question (``is there the digit 7 ?``): ``answer`` the yes/no alone;
#: ``description`` the scene's description first (``3 top left , 7 center , yes``); ``lookup`` the asked
#: digit's place first (``7 center , yes``; absent: ``7 , no``; the small digit: ``7 small , yes``)
EXISTENCE_FORMS = ("answer", "description", "lookup")


def lookup_rationale(qa: QA) -> str:
    """An existence question's look-up rationale: the asked digit and its place in the scene, read from the
    question and the description in ``qa.rationale`` (``is there the digit 7 ?`` over ``3 top left , 7
    center`` -> ``7 center``; over ``3 top left , small 7`` -> ``7 small``; absent -> ``7``). The word after
    the digit, a place or ``,``, is the existence decision, made where the model looks the digit up (the
    value -> cell look-up a spatial rationale trains)."""
    digit = qa.question.split()[-2]
    for part in qa.rationale.split(" , "):
        words = part.split()
        if words[0] == digit:
            return " ".join(words)
        if words[:2] == ["small", digit]:
            return f"{digit} small"
    return digit


def training_target(qa: QA, rationale: bool, axis: bool = False, existence: str = "answer") -> str:
    """The text a model learns to write for ``qa`` (before ``</s>``): the answer, or with a rationale first,
    ``<rationale> , <answer>``: a spatial question with ``rationale`` (``axis``: :func:`axis_rationale`), an
    existence question in the form ``existence`` (:data:`EXISTENCE_FORMS`: the scene's description or the
    asked digit's place, :func:`lookup_rationale`)."""
    if qa.qtype == "existence":
        if existence not in EXISTENCE_FORMS:
            raise ValueError(f"existence={existence!r} is invalid: accepted {EXISTENCE_FORMS}")
        if existence == "answer" or not qa.rationale:
            return qa.answer
        why = qa.rationale if existence == "description" else lookup_rationale(qa)
        return f"{why} , {qa.answer}"
    if not (rationale and qa.rationale):
        return qa.answer
    return f"{axis_rationale(qa) if axis else qa.rationale} , {qa.answer}"


#: new tokens that hold the longest trained answer (``3 bottom right , 7 bottom left , yes`` + ``</s>``)
RATIONALE_NEW_TOKENS = 10
#: new tokens that hold an existence answer after the description of a full 3x3 grid (9 items of at most 3
#: words, 8 commas, ``, yes``, ``</s>``)
EXISTENCE_NEW_TOKENS = 38
#: new tokens that hold an existence answer after its look-up (``7 bottom right , yes`` + ``</s>``)
EXISTENCE_LOOKUP_TOKENS = 6


def rationale_tokens(qa: QA, spatial: bool, existence: str = "answer") -> int:
    """New tokens a model writes a rationale and the answer of ``qa`` in (0: it answers directly), for a
    model trained with spatial rationales (``spatial``) and existence answers in form ``existence``
    (:data:`EXISTENCE_FORMS`)."""
    if qa.qtype == "existence":
        return {"description": EXISTENCE_NEW_TOKENS, "lookup": EXISTENCE_LOOKUP_TOKENS}.get(existence, 0)
    return RATIONALE_NEW_TOKENS if spatial and qa.rationale else 0


#: question types of the training turns (index = ``answer_types`` in a training batch); ``relation`` tags
#: the scored answer word written after a rationale (the yes/no of a spatial turn), ``text`` the other
#: trained words of text-only turns (``text_relation``)
LOSS_TYPES: tuple[str, ...] = QUESTION_TYPES + ("describe", "relation", "text", "lookup", "existence")
RELATION = LOSS_TYPES.index("relation")
#: ``lookup`` tags the place words of a spatial rationale (``left``, ``top``, ``center`` ...)
LOOKUP = LOSS_TYPES.index("lookup")


def routing_targets(qa: QA, scene, rationale: bool, axis: bool = False, existence: str = "answer"
                    ) -> list[tuple[int, tuple[int, ...]]]:
    """Where a turn must look (:func:`~tokenreduce.models.vlm.losses.routing_loss`): ``(i, cells)`` pairs,
    ``i`` = -1 for the last prompt token (``:``, which predicts the first answer word) or the index of the
    answer word (= token: the tokenizer is word-level) whose next word needs the digits in ``cells``:

    - identity / comparison / detail: ``:`` -> the asked cell(s) / the small digit's cell;
    - spatial with a rationale (``3 top left , 7 center , no``): each digit word -> its cell (the next words
      name it); without a rationale ``:`` -> both digits' cells;
    - describe (``3 top left , 7 center , small 5``): each regular digit word -> its cell, ``:`` and every
      ``,`` -> the cell described next, ``small`` -> the small digit's cell; likewise an existence
      question's description rationale (``existence="description"``; the yes/no after it needs no look-up);
    - existence with its look-up (``existence="lookup"``, ``7 center , yes``): the digit word -> its cell
      when the digit is present (an absent one has nowhere to look).
    Counting has none."""
    d, words = scene.digits, training_target(qa, rationale, axis, existence).split()
    if qa.qtype == "identity":
        return [(-1, (POSITION_NAMES.index(qa.question[len("what digit is at the "):-2]),))]
    if qa.qtype == "comparison":
        a, b = qa.question[len("which is larger , the "):-len(" digit ?")].split(" digit or the ")
        return [(-1, (POSITION_NAMES.index(a), POSITION_NAMES.index(b)))]
    if qa.qtype == "detail":
        return [(-1, (scene.small_cell,))]
    if qa.qtype == "spatial":
        cells = tuple(d.index(int(w)) for w in qa.question.split() if w.isdigit())
        if not (rationale and qa.rationale):
            return [(-1, cells)]
        return [(i, (d.index(int(w)),)) for i, w in enumerate(words) if w.isdigit() and i < len(words) - 1]
    if qa.qtype == "describe":
        return _description_routes(words, scene)
    if qa.qtype == "existence" and existence == "description" and qa.rationale:
        return _description_routes(words[:-2], scene)  # the description; not its ``, yes``
    if qa.qtype == "existence" and existence == "lookup" and qa.answer == "yes":
        return [(0, (scene.digits.index(int(words[0])),))]
    return []


def _description_routes(words: list[str], scene) -> list[tuple[int, tuple[int, ...]]]:
    """:func:`routing_targets` of a description's words (``3 top left , 7 center , small 5``)."""
    d = scene.digits
    out: list[tuple[int, tuple[int, ...]]] = []
    prev = -1  # the word before the next item (``:`` for the first)
    i = 0
    while i < len(words):
        if words[i] == "small":
            out += [(prev, (scene.small_cell,)), (i, (scene.small_cell,))]
            i += 2
        else:
            cell = d.index(int(words[i]))
            out += [(prev, (cell,)), (i, (cell,))]
            i += 1 + len(POSITION_NAMES[cell].split())
        prev = i  # the ``,``
        i += 1
    return out


def ordered_description(qa: QA, scene, order: str) -> QA:
    """A ``describe`` turn (or an ``existence`` turn's rationale, the same description) with its regular
    digits in ``order`` (:data:`~tokenreduce.models.vlm.config.DESCRIBE_ORDERS`; the generator writes them by
    cell); the small digit stays last."""
    if order == "cell":
        return qa
    field = "rationale" if qa.qtype == "existence" else "answer"
    parts = getattr(qa, field).split(" , ")
    small = [p for p in parts if p.startswith("small ")]
    regular = sorted((p for p in parts if not p.startswith("small ")), key=lambda p: int(p.split()[0]))
    return qa._replace(**{field: " , ".join(regular + small)})
