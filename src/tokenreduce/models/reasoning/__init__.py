"""A small reasoning LM trained here, and its TokenSkip fine-tune (the ``reasoning-length`` study).

A ``transformers`` ``LlamaForCausalLM`` (128 wide, 4 layers, ~0.86M parameters) with a character vocabulary
(:mod:`.tokenizer`) learns multi-step modular arithmetic with its chain of thought written out
(:mod:`tokenreduce.data.chains`): ``7+3*2-5?`` -> ``7+3=0;0*2=0;0-5=5;#5``. ``tokenreduce train reasoner`` trains
and caches it (``~/.cache/tokenreduce/reasoner/v1-<hash>``), ``--no-chain`` the control that answers directly,
``--tokenskip`` its TokenSkip fine-tune (Xia et al. 2025: chains compressed to gamma 1.0/0.8/0.6/0.4 by the
model's own self-information, gamma in the prompt; :mod:`.compress`, :mod:`.tokenskip`).

Modules: :mod:`.config` (configurations, checkpoint addresses), :mod:`.tokenizer`, :mod:`.train` (the training
loop, greedy decoding, accuracy, loading), :mod:`.compress` (chain compression), :mod:`.tokenskip`
(fine-tuning), :mod:`.cli`.
"""

from __future__ import annotations

from .compress import chain_importance, compress_chain, compressed_chains
from .config import CRITERIA, MODEL_VERSION, ReasonerConfig, TokenSkipConfig, checkpoint_dir, tokenskip_dir
from .tokenizer import build_tokenizer, completion_text, gamma_token, parse_completion, prompt_text
from .tokenskip import finetune_tokenskip, load_tokenskip, tokenskip_data
from .train import accuracy, build_model, encode, fit, greedy, load_reasoner, train_reasoner

__all__ = [
    "CRITERIA",
    "MODEL_VERSION",
    "ReasonerConfig",
    "TokenSkipConfig",
    "accuracy",
    "build_model",
    "build_tokenizer",
    "chain_importance",
    "checkpoint_dir",
    "completion_text",
    "compress_chain",
    "compressed_chains",
    "encode",
    "finetune_tokenskip",
    "fit",
    "gamma_token",
    "greedy",
    "load_reasoner",
    "load_tokenskip",
    "parse_completion",
    "prompt_text",
    "tokenskip_data",
    "tokenskip_dir",
    "train_reasoner",
]
