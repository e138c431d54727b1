"""The study registry: close names for typos, planned studies, typed --set overrides, missing models."""

from __future__ import annotations

import pytest

from tokenreduce.study import get_study, parse_overrides
from tokenreduce.study.distraction import DistractionConfig
from tokenreduce.study.hallucination import HallucinationConfig


def test_unknown_study_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean 'distraction'"):
        get_study("distraktion")
    with pytest.raises(ValueError, match="did you mean 'reasoning-length'"):
        get_study("reasoning_length")
    assert get_study("hallucination").name == "hallucination"


def test_every_study_states_hypothesis_and_test_in_its_docstring():
    for name in ("distraction", "hallucination", "reasoning-length"):
        doc = get_study(name).doc
        assert "**Hypothesis**" in doc and "**Test.**" in doc


def test_overrides_are_typed_by_the_defaults():
    o = parse_overrides(DistractionConfig, ["lengths=1024, 2048", "n_prompts=64", "ppl=false", "keeps=0.5",
                                            "kv_variants=snapkv-q-max9"])
    assert o == {"lengths": (1024, 2048), "n_prompts": 64, "ppl": False, "keeps": (0.5,),
                 "kv_variants": ("snapkv-q-max9",)}
    with pytest.raises(ValueError, match="did you mean 'n_prompts'"):
        parse_overrides(DistractionConfig, ["n_prompt=3"])
    with pytest.raises(ValueError, match="is not a int"):
        parse_overrides(DistractionConfig, ["n_prompts=many"])
    with pytest.raises(ValueError, match="field=value"):
        parse_overrides(HallucinationConfig, ["n_scenes"])


def test_missing_models_name_the_command_that_builds_them(monkeypatch, tmp_path):
    from tokenreduce.models import gemma
    from tokenreduce.study import run_study

    monkeypatch.setattr(gemma, "gemma_cache_ready", lambda: False)
    with pytest.raises(FileNotFoundError, match="tokenreduce convert gemma"):
        run_study("distraction", out=tmp_path)
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenreduce train vlm`"):
        run_study("hallucination", out=tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenreduce train vlm --existence"):
        run_study("hallucination", out=tmp_path, overrides={"model": "existence"})
    with pytest.raises(FileNotFoundError, match="tokenreduce train vlm --existence --existence-rationale`"):
        run_study("hallucination", out=tmp_path, overrides={"model": "existence-rationale"})
    with pytest.raises(FileNotFoundError, match="tokenreduce train vlm --existence --existence-lookup`"):
        run_study("hallucination", out=tmp_path, overrides={"model": "existence-lookup"})
    with pytest.raises(ValueError, match="model"):
        run_study("hallucination", out=tmp_path, overrides={"model": "pope"})
    with pytest.raises(FileNotFoundError, match=r"tokenreduce train reasoner`.*tokenreduce train reasoner --tokenskip"):
        run_study("reasoning-length", out=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--tokenskip --force-keep ';=' --lr 0.0001`"):
        run_study("reasoning-length", out=tmp_path, overrides={"force_keep": ";=", "tokenskip_lr": 1e-4})
    assert not list(tmp_path.glob("*.jsonl"))


def test_bad_study_settings_fail_before_a_model_loads():
    with pytest.raises(ValueError, match="unknown method 'fastvv'"):
        get_study("hallucination").sweep(HallucinationConfig(methods=("fastvv",)), smoke=True)
    with pytest.raises(ValueError, match="unknown variants"):
        get_study("distraction").sweep(DistractionConfig(kv_variants=("snap",)), smoke=True)


def test_query_awareness_comes_from_the_methods_themselves():
    from tokenreduce.study.distraction import _is_query_aware

    aware = {m: _is_query_aware({"method": m}) for m in ("snapkv-q-max9", "pyramidkv-q", "gemfilter-q-max9",
                                                         "streaming-llm", "snapkv", "none", "prompt:longllmlingua",
                                                         "prompt:extractive", "prompt:llmlingua", "prompt:random")}
    assert [m for m, a in aware.items() if a] == ["snapkv-q-max9", "pyramidkv-q", "gemfilter-q-max9",
                                                  "prompt:longllmlingua", "prompt:extractive"]
