"""kvpress's side of `bench kv` in its own virtualenv, from one `bench kv` command (``--kvpress-python``):
kvpress 0.5.5 needs transformers < 5.3, so ours and kvpress's presses can share timing rounds only in its venv
(``make peers`` builds ``.venv-kvpress`` with tokenreduce installed there without dependencies).

Passcode accuracy and kept positions: with the passcode or agreement part, ``scripts/kvpress_compare.py`` (a
clone's) runs in the venv on the exported prompts and writes ``<out>/kvpress.jsonl``.

The main process writes the timing prompts (the export part's JSON: the venv lacks the text data), runs
``python -m tokenreduce.bench.kv --parts timing`` with the same settings in the venv (every candidate, ours and
kvpress's, interleaved in the same rounds against the same unreduced ``none``), and appends that run's rows to
``<out>/kv.jsonl`` under its timing label; the report then shows them side by side (:mod:`.report`)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from .config import KVBenchConfig
from .runs import merge_results

__all__ = ["KVPRESS_LABEL", "check_kvpress_here", "check_kvpress_python", "kvpress_compare_command", "kvpress_venv_command",
           "run_compare_in_kvpress_venv", "run_timing_in_kvpress_venv"]

#: the timing label of a run made in kvpress's venv when the command gave none of its own
KVPRESS_LABEL = "kvpress venv"


def check_kvpress_here() -> None:
    """``--timing-kvpress`` without ``--kvpress-python`` runs kvpress in this python: it must have kvpress."""
    import importlib.util

    from ..peers import PEERS, PeerEnvError, missing_message

    if importlib.util.find_spec("kvpress") is None:
        peer = PEERS["kvpress"]
        raise PeerEnvError(missing_message(peer, sys.executable, {"kvpress": "not found"}) +
                           f", or run this command with --kvpress-python {peer.venv}/bin/python")


def kvpress_venv_command(cfg: KVBenchConfig, prompts: Path, out: Path) -> list[str]:
    """The command line of the timing run in the venv (``cfg.kvpress_python``), the same settings as ``cfg``."""
    label = cfg.timing_label if cfg.timing_label != "main" else KVPRESS_LABEL
    args = {"--parts": "timing", "--timing-prompts": str(prompts),
            "--timing-lengths": ",".join(map(str, cfg.timing_lengths)),
            "--timing-new-tokens": str(cfg.timing_new_tokens), "--timing-candidates": ",".join(cfg.timing_candidates),
            "--timing-kvpress": ",".join(cfg.timing_kvpress), "--timing-label": label, "--clock": cfg.clock,
            "--repeats": str(cfg.repeats), "--threads": str(cfg.threads), "--dtype": cfg.dtype, "--attn": cfg.attn,
            "--out": str(out)}
    flags = ["--timing-memory" if cfg.timing_memory else "--no-timing-memory"]
    return [str(cfg.kvpress_python), "-m", "tokenreduce.bench.kv",
            *[x for kv in args.items() for x in kv], *flags]


def check_kvpress_python(cfg: KVBenchConfig) -> str:
    """``cfg.kvpress_python`` exists and finds every module kvpress's side imports (else one error naming them
    and the make target); returns it."""
    from ..peers import check_peer_python

    python = cfg.kvpress_python
    if not python or not Path(python).is_file():
        raise FileNotFoundError(f"--kvpress-python {python}: no such python interpreter (build kvpress's virtualenv "
                                f"with `make peers`: .venv-kvpress/bin/python)")
    check_peer_python(python, "kvpress")
    return python


def _run(cmd: list[str], what: str) -> None:
    print(f"in kvpress's venv ({what}):", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} in kvpress's venv failed (exit {proc.returncode}): {' '.join(cmd)}")


def kvpress_compare_command(cfg: KVBenchConfig, prompts: Path, out: Path) -> list[str]:
    """``scripts/kvpress_compare.py`` on the exported prompts: the passcode part (``cfg.keeps``) and/or the kept
    positions (the agreement part), as ``cfg.parts`` asks."""
    from ..peers import REPO

    script = REPO / "scripts" / "kvpress_compare.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: kvpress's passcode and agreement side runs from a clone")
    cmd = [str(cfg.kvpress_python), str(script), "--prompts", str(prompts), "--out", str(out),
           "--keeps", ",".join(map(str, cfg.keeps)), "--threads", str(cfg.threads)]
    if "passcode" not in cfg.parts:
        cmd.append("--skip-passcode")
    if "agreement" not in cfg.parts:
        cmd.append("--skip-kept")
    return cmd


def run_compare_in_kvpress_venv(cfg: KVBenchConfig, prompts: Path, resume: bool = True) -> None:
    """kvpress's passcode accuracies and kept positions into ``<out>/kvpress.jsonl`` (``prompts``: the export
    part's JSON). ``resume``: skipped when that file already holds rows of every part asked for (delete it to
    run kvpress's side again)."""
    from .runs import latest_runs

    check_kvpress_python(cfg)
    path = Path(cfg.out) / "kvpress.jsonl"
    wanted = {p for part, p in (("passcode", "kvpress_passcode"), ("agreement", "kvpress_kept")) if part in cfg.parts}
    if resume and path.exists() and wanted <= set(latest_runs(path)):
        print(f"kvpress's passcode/agreement side already in {path} (delete it to run it again)")
        return
    _run(kvpress_compare_command(cfg, prompts.resolve(), (Path(cfg.out) / "kvpress.jsonl").resolve()),
         "kvpress_compare.py")


def run_timing_in_kvpress_venv(cfg: KVBenchConfig, tok: object) -> int:
    """Run the timing part in kvpress's venv and merge its rows into ``<out>/kv.jsonl``; returns the number of
    rows merged. Raises :class:`~..peers.PeerEnvError` when the venv lacks a module, ``RuntimeError`` when the
    run fails (its output was streamed)."""
    from .data import export_for_kvpress

    check_kvpress_python(cfg)
    out = Path(cfg.out)
    sub = out / "kvpress-venv"
    prompts = export_for_kvpress(tok, dataclasses.replace(cfg, lengths=[]), sub / "timing_prompts.json")
    cmd = kvpress_venv_command(cfg, prompts.resolve(), sub.resolve())
    _run(cmd, "timing")
    return merge_results([f"{sub / 'kv.jsonl'}@timing+memory"], out / "kv.jsonl")["rows"]
