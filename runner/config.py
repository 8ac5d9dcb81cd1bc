"""The run configuration: pydantic models, YAML loading and dotted `--key.path=value` overrides.

Everything a run does is decided here, validated before any weights are read, and written
back resolved into report.json. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError

Method = Literal["none", "rtn", "gptq", "awq", "awq+gptq"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field(..., description="Local HF model directory (config.json, safetensors, tokenizer).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the blocks during calibration and evaluation."
    )
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint dir.")


class CalibConfig(_Section):
    path: str | None = Field(
        None, description="Calibration text: file, folder, jsonl/parquet, or a datasets name (required to quantize)."
    )
    text_field: str = Field("text", description="Field holding the text in jsonl/parquet/datasets sources.")
    split: str = Field("train", description="Split of a datasets source.")
    dataset_config: str | None = Field(None, description="Config name of a datasets source.")
    n_samples: int = Field(128, ge=1, description="Number of calibration windows.")
    seq_len: int = Field(512, ge=2, description="Tokens per window.")
    seed: int = Field(0, description="Seed of the random window offsets.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    propagate: Literal["quantized", "fp"] = Field(
        "quantized", description="Inputs of block i: outputs of the quantized (GPTQ) or fp blocks < i."
    )


class QuantConfig(_Section):
    method: Method = Field(
        "gptq",
        description="none (identity, for debugging), rtn, gptq, awq (activation-aware scales, then RTN) "
        "or awq+gptq (the same scales, then GPTQ).",
    )
    bits: int = Field(4, description="Bits per weight, 2..8.")
    group_size: int = Field(128, description="Columns per quantization group; -1 = per output channel.")
    symmetric: bool = Field(True, description="Symmetric (zero point fixed mid-range) or asymmetric.")
    act_order: bool = Field(False, description="GPTQ: process columns by decreasing Hessian diagonal.")
    static_groups: bool = Field(False, description="GPTQ: fix group qparams before act-order.")
    damp: float = Field(0.01, gt=0, lt=1, description="GPTQ damping, fraction of mean(diag(H)).")
    block_size: int = Field(128, ge=1, description="GPTQ lazy-batch width.")
    true_sequential: bool = Field(
        True, description="Quantize q/k/v, o, gate/up, down in order, each seeing the earlier ones quantized."
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Module names or suffixes left in full precision.",
    )
    awq_grid: int = Field(20, ge=1, description="AWQ: scale exponents tried, alpha = i/awq_grid for i < awq_grid.")
    awq_duo_scaling: bool = Field(
        True,
        description="AWQ: scales mean(abs(x))^alpha / mean(abs(w))^(1-alpha) (w normalized per group) "
        "instead of mean(abs(x))^alpha.",
    )
    awq_clip: bool = Field(
        True, description="AWQ (method awq only; GPTQ compensates itself): search a range shrink per (row, group)."
    )
    awq_clip_grid: int = Field(20, ge=1, description="AWQ clip search: ratios 1 - i/awq_clip_grid.")
    awq_clip_max_shrink: float = Field(
        0.5, gt=0, lt=1, description="AWQ clip search: shrink ratios tried down to 1 - awq_clip_max_shrink."
    )
    awq_clip_tokens: int = Field(512, ge=1, description="AWQ clip search: input rows sampled (evenly spaced).")

    @field_validator("bits")
    @classmethod
    def _bits_range(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"must be between 2 and 8, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"must be -1 (per channel) or a positive number of columns, got {v}")
        return v


class EvalConfig(_Section):
    enabled: bool = Field(True, description="Measure perplexity when eval.path is set.")
    path: str | None = Field(None, description="Perplexity text (same source kinds as calib.path); unset = no evaluation.")
    text_field: str = Field("text", description="Field holding the text in jsonl/parquet/datasets sources.")
    split: str = Field("test", description="Split of a datasets source.")
    dataset_config: str | None = Field(None, description="Config name of a datasets source.")
    seq_len: int = Field(512, ge=2, description="Tokens per window (consecutive, non-overlapping).")
    n_samples: int | None = Field(32, ge=1, description="Windows; null = every full window of the text.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    fp: bool = Field(True, description="Also measure the unquantized model on the same windows.")


class ExportConfig(_Section):
    format: Literal["fake", "compressed-tensors", "gptq"] = Field("fake", description="Checkpoint layout written to output/model.")
    shard_size: str = Field("2GB", description="Maximum bytes per safetensors shard, e.g. 500MB, 5GB.")

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


class ClusterConfig(_Section):
    backend: Literal["local", "ray"] = Field("local", description="Executor (ray: planned).")
    address: str | None = Field(None, description="Ray cluster address (planned).")
    workers: int = Field(1, ge=1, description="Ray workers (planned).")


class WandbConfig(_Section):
    mode: Literal["disabled", "offline", "online"] = Field("disabled", description="W&B tracking: disabled (no import, no network), offline (local files under output/wandb), online.")
    project: str = Field("shardquant", description="W&B project.")


class TrackingConfig(_Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class RunConfig(_Section):
    model: ModelConfig
    calib: CalibConfig = Field(default_factory=CalibConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: str = Field("runs/latest", description="Run directory.")
    resume: bool = Field(False, description="Continue an interrupted run in output (planned).")

    @model_validator(mode="after")
    def _methods(self) -> RunConfig:
        if self.cluster.backend == "ray":
            raise ValueError("cluster.backend: 'ray' is not available in this version; use 'local'")
        if self.resume:
            raise ValueError("resume: resuming is not available in this version; rerun without it")
        return self


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """Parse '500MB', '2GB', '1GiB' or a plain byte count."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise ValueError(f"'{text}' is not a size like 500MB or 2GB")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"'{text}' is not a size like 500MB or 2GB") from None
    if value <= 0:
        raise ValueError(f"'{text}' must be positive")
    return int(value * _UNITS[unit])


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind == "extra_forbidden":
        return f"unknown config key '{loc}'"
    if kind == "missing":
        return f"missing required config key '{loc}'"
    given = first.get("input")
    shown = repr(given) if not isinstance(given, dict) else "a mapping"
    if not loc:
        return f"invalid config: {msg}"
    if msg.startswith(loc + ":"):
        return msg
    return f"{loc}: {msg} (got {shown})"


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `--a.b=c` and `--a.b c` arguments (a W&B agent's form) into {"a.b": value}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise UserError(f"unexpected argument '{arg}': overrides look like --quant.bits=3")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise UserError(f"override '--{body}' has no value: use --{body}=VALUE")
            key, raw = body, args[i + 1]
            i += 1
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{arg}' has an empty key")
        out[key] = _parse_value(raw)
        i += 1
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise UserError(f"override '{key}': '{'.'.join(parts[: depth + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into one UserError line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            line = f" at line {mark.line + 1}"
        raise UserError(f"config file '{p}' is not valid YAML{line}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{p}' must hold a mapping of sections, not {type(data).__name__}")
    return data


def build_config(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Validate a config mapping with dotted overrides applied; raise UserError naming the key."""
    tree = _deep_copy(data)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_error(e)) from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load CONFIG.yaml and apply CLI overrides (list of args or a parsed mapping)."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return build_config(load_yaml(path), overrides)


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (for report.json and W&B)."""
    return cfg.model_dump(mode="json")


def reference_rows(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every config key, in declaration order."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(reference_rows(ann, f"{prefix}{name}."))
            continue
        if f.is_required():
            default = "required"
        else:
            default = f"`{yaml.safe_dump(f.get_default(call_default_factory=True), default_flow_style=True).strip().removesuffix('...').strip()}`"
        rows.append((f"{prefix}{name}", default, f.description or ""))
    return rows


def reference_markdown() -> str:
    """The config-key table of docs/config.md (a test keeps the file equal to this)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | {d} | {m} |" for k, d, m in reference_rows()]
    return "\n".join(lines) + "\n"
