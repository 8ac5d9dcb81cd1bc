"""Calibration and evaluation text: load it from a file, folder or dataset, cut it into windows.

``load_text`` reads one text source into a string; ``token_windows`` tokenizes it once and
cuts ``[n, seq_len]`` windows: random ones for calibration (as GPTQ does), consecutive ones
for perplexity. Every problem with the user's data is a one-line ``UserError`` that names the
config key and the source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from shardquant.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# Suffixes that mark a source as a path (never a `datasets` name) even without a leading / . ~
PATH_SUFFIXES = frozenset(
    {*TEXT_SUFFIXES, *JSON_SUFFIXES, *PARQUET_SUFFIXES, ".text", ".csv", ".tsv", ".arrow",
     ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar"}
)
MODES = ("random", "sequential")


def load_text(
    source: str | os.PathLike[str],
    *,
    key: str,
    text_field: str = "text",
    split: str = "train",
    dataset_config: str | None = None,
) -> str:
    """Read a text source into one string.

    ``source`` is a ``.txt``/``.md`` file; a folder (its ``*.txt`` files sorted by name, joined
    with a blank line); a ``.jsonl``/``.json`` file (JSON lines or a JSON list of objects) or a
    ``.parquet`` file, whose ``text_field`` values are joined with a blank line; or else a
    ``datasets`` name (``datasets.load_dataset(source, dataset_config, split=split)``).

    Anything that looks like a path (starts with ``/``, ``.`` or ``~``, or ends in a file
    suffix such as ``.txt``) must exist; only a bare name goes to ``datasets``. ``key`` is the
    config key named in errors, e.g. ``"calib.path"``.
    """
    source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"{key}: empty text source; give a file, a folder or a datasets name")
    path = Path(source).expanduser()
    if path.exists():
        text = _read_path(path, source, key=key, text_field=text_field)
    elif _looks_like_path(source):
        raise UserError(f"{key}: no such file or folder: {source}")
    else:
        text = _read_dataset(source, key=key, text_field=text_field, split=split,
                             dataset_config=dataset_config)
    if not text.strip():
        raise UserError(f"{key}: {source} holds no text")
    return text


def token_windows(
    tokenizer: Any,
    text: str,
    *,
    n_samples: int | None,
    seq_len: int,
    seed: int,
    mode: str,
    key: str,
    source: str | None = None,
) -> torch.LongTensor:
    """Tokenize ``text`` once and cut it into a ``[n, seq_len]`` LongTensor of token windows.

    - ``mode="random"`` (calibration): ``n_samples`` windows whose start offsets are drawn
      uniformly from ``[0, n_tokens - seq_len]`` by a ``torch.Generator`` seeded with ``seed``.
    - ``mode="sequential"`` (evaluation): consecutive, non-overlapping windows from the start;
      ``n_samples=None`` takes as many as fit (``seed`` is unused).

    ``key`` is the config section, ``"calib"`` or ``"eval"`` (a trailing ``".path"`` is
    dropped, so the key given to :func:`load_text` works too); errors name
    ``<key>.n_samples``, ``<key>.seq_len`` and ``<key>.path``. ``source`` names the text in
    errors. No special tokens (BOS/EOS) are added.
    """
    section = key.removesuffix(".path")
    what = source if source is not None else "the text"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise UserError(f"{section}.seq_len={seq_len!r} must be an integer >= 2")
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int)
                                  or n_samples < 1):
        raise UserError(f"{section}.n_samples={n_samples!r} must be an integer >= 1")
    if mode == "random" and n_samples is None:
        raise UserError(f"{section}.n_samples must be set for random calibration windows")

    # verbose=False: no "sequence length is longer than the maximum" warning for long texts.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    tokens = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n_tokens = tokens.numel()
    if n_tokens < seq_len + 1:
        raise UserError(
            f"{section}.seq_len={seq_len} is longer than {section}.path allows: "
            f"{what} has {n_tokens} tokens"
        )

    if mode == "random":
        assert n_samples is not None
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, n_tokens - seq_len + 1, (n_samples,), generator=gen)
        return tokens[starts[:, None] + torch.arange(seq_len)]

    fit = n_tokens // seq_len
    n = fit if n_samples is None else n_samples
    if n > fit:
        raise UserError(
            f"{section}.n_samples={n} is more than {section}.path holds: {what} has {n_tokens} "
            f"tokens, {fit} windows of {section}.seq_len={seq_len} fit"
        )
    return tokens[: n * seq_len].reshape(n, seq_len).clone()


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or Path(source).suffix.lower() in PATH_SUFFIXES
    )


def _read_path(path: Path, source: str, *, key: str, text_field: str) -> str:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"{key}: folder {source} holds no .txt files")
        return "\n\n".join(_read_file_text(p, key=key) for p in files)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _read_file_text(path, key=key)
    if suffix in JSON_SUFFIXES:
        return _join(_json_values(path, source, key=key, text_field=text_field))
    if suffix in PARQUET_SUFFIXES:
        return _join(_parquet_values(path, source, key=key, text_field=text_field))
    kinds = ", ".join((*TEXT_SUFFIXES, *JSON_SUFFIXES, *PARQUET_SUFFIXES))
    raise UserError(f"{key}: {source} is not a supported file type (use a folder or {kinds})")


def _read_file_text(path: Path, *, key: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig drops a byte-order mark; newlines are normalized as text mode would.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{key}: {path} is not UTF-8 text (undecodable byte at offset {exc.start})"
        ) from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _json_values(path: Path, source: str, *, key: str, text_field: str) -> list[str]:
    text = _read_file_text(path, key=key)
    stripped = text.lstrip()
    records: list[tuple[str, Any]] = []  # (where, record)
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{key}: {source} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        records = [(f"item {i}", rec) for i, rec in enumerate(data)]
    else:
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{key}: {source} line {lineno} is not valid JSON ({exc.msg}); expected JSON "
                    "lines or a JSON list of objects"
                ) from exc
    values: list[str] = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise UserError(
                f"{key}: {source} {where} is a {type(rec).__name__}, expected an object with "
                f"a '{text_field}' field"
            )
        if text_field not in rec:
            fields = ", ".join(map(str, rec)) or "none"
            raise UserError(f"{key}: {source} {where} has no field '{text_field}' (fields: {fields})")
        value = rec[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise UserError(
                f"{key}: {source} {where} field '{text_field}' is a {type(value).__name__}, "
                "expected a string"
            )
        values.append(value)
    return values


def _parquet_values(path: Path, source: str, *, key: str, text_field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            columns = ", ".join(schema.names) or "none"
            raise UserError(f"{key}: {source} has no column '{text_field}' (columns: {columns})")
        column = pq.read_table(path, columns=[text_field]).column(text_field)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{key}: {source} is not a readable parquet file ({_one_line(exc)})") from exc
    is_view = getattr(pa.types, "is_string_view", lambda _t: False)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or is_view(column.type)):
        raise UserError(
            f"{key}: {source} column '{text_field}' holds {column.type}, expected strings"
        )
    return [v for v in column.to_pylist() if v is not None]


def _read_dataset(source: str, *, key: str, text_field: str, split: str,
                  dataset_config: str | None) -> str:
    what = f"dataset '{source}'" + (f" ({dataset_config})" if dataset_config else "")
    try:
        import datasets

        ds = datasets.load_dataset(source, dataset_config, split=split)
    except Exception as exc:  # datasets raises many types; all mean "cannot load it"
        raise UserError(
            f"{key}: {source} is no local file or folder, and datasets cannot load "
            f"{what} split '{split}': {_one_line(exc)}"
        ) from exc
    columns = list(getattr(ds, "column_names", None) or [])
    if text_field not in columns:
        raise UserError(
            f"{key}: {what} has no column '{text_field}' (columns: {', '.join(columns) or 'none'})"
        )
    values = ds[text_field]
    if not all(v is None or isinstance(v, str) for v in values):
        raise UserError(f"{key}: {what} column '{text_field}' does not hold strings")
    return _join(v for v in values if v is not None)


def _join(values: Any) -> str:
    return "\n\n".join(values)


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    name = type(exc).__name__
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{name}: {msg}" if msg else name
