"""The run configuration: pydantic models, YAML loading and dotted `--key.path=value` overrides.

Everything a run does is decided here, validated before any weights are read, and written
back resolved into report.json. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shardquant.errors import UserError
from shardquant.presets import PRESETS, SUPPORTED_STRATEGIES, Preset, preset

Method = Literal["none", "rtn", "gptq", "awq", "awq+gptq"]
GPTQ_METHODS: tuple[str, ...] = ("gptq", "awq+gptq")  # methods solved by GPTQ (a Hessian, act order)
AWQ_METHODS: tuple[str, ...] = ("awq", "awq+gptq")  # methods that search and fold AWQ scales


def compute_dtype(dtype: str, device_type: str) -> str:
    """`model.dtype` resolved for a device type ('cuda', 'cpu', ...): 'auto' is bfloat16 on
    CUDA (half the activation and weight memory, the GPU's fast path) and float32 elsewhere
    (CPU bfloat16 matmuls are slow and less exact)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_type == "cuda" else "float32"


def is_ignored(name: str, patterns: list[str]) -> bool:
    """True when a module name matches `quant.ignore`: exact, dotted suffix, or 're:REGEX'."""
    for pat in patterns:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field(..., description="Local HF model directory (config.json, safetensors, tokenizer).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype of the blocks during calibration and evaluation: auto = bfloat16 on "
        "CUDA, float32 on CPU. Hessians and the GPTQ solve are float32 whatever this says.",
    )
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint dir.")


class CalibConfig(_Section):
    path: str | None = Field(
        None, description="Calibration text: file, folder, jsonl/parquet, or a datasets name (required to quantize; not read by "
        "a data-free rtn run, one without SmoothQuant or static input scales)."
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
    reuse_stages: bool | Literal["auto"] = Field(
        "auto",
        description="Keep a block's finished attention/MLP outputs between true-sequential passes, so a block "
        "costs about one forward pass instead of ~3.5 (extra memory: tokens x (hidden + intermediate)). auto: on, "
        "unless the plan says the run would not fit cluster.worker_memory with it.",
    )


class QuantConfig(_Section):
    method: Method = Field(
        "gptq",
        description="none (identity, for debugging), rtn, gptq, awq (activation-aware scales, then RTN) "
        "or awq+gptq (the same scales, then GPTQ).",
    )
    scheme: str | None = Field(
        None,
        description="A compressed-tensors preset (its own QuantizationScheme): " + ", ".join(PRESETS) + ". "
        "Unset = integer weights from bits/group_size/symmetric (W4A16 by default). bits, group_size and "
        "symmetric refine an integer preset; a value the preset fixes otherwise is an error. Float presets "
        "(FP8*, NVFP4*, MXFP4*) take rtn or gptq.",
    )
    weights_only: bool = Field(
        False,
        description="With a preset that also quantizes input activations (W8A8, W4AFP8, FP8*, NVFP4, MXFP4): "
        "keep only its weights (e.g. FP8_DYNAMIC becomes FP8 weights with 16-bit activations). Without it the "
        "inputs of every quantized linear are quantized as the preset says (dynamic per token or group, or static "
        "scales calibrated from the observed input ranges), in evaluation as in the export.",
    )
    smoothquant: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="SmoothQuant alpha in (0, 1) (null: off): before solving, each input group's channels are "
        "scaled by s = max|x|^alpha / max|w|^(1-alpha) (columns of its linears times s, the op before it divided "
        "by s: the folding AWQ uses), moving activation outliers into the weights. For presets that quantize "
        "activations (W8A8, ...), with rtn or gptq.",
    )
    smoothquant_stat: Literal["absmax", "range"] = Field(
        "absmax",
        description="With quant.smoothquant: the activation statistic in its scales. 'absmax': max|x| per channel "
        "(the SmoothQuant paper's); 'range': (max x - min x) / 2 per channel (llm-compressor's statistic, halved to "
        "agree on channels symmetric around zero; measured better on SmolLM2 W8A8, benchmarks/RESULTS.md). Both "
        "merge exactly over workers.",
    )
    bits: int = Field(4, description="Bits per weight, 2..8.")
    group_size: int = Field(128, description="Columns per quantization group; -1 = per output channel.")
    symmetric: bool = Field(True, description="Symmetric (zero point fixed mid-range) or asymmetric.")
    act_order: bool = Field(
        True,
        description="GPTQ: process columns by decreasing Hessian diagonal (default with static_groups: measured "
        "best, benchmarks/RESULTS.md). reorder: group turns the default off.",
    )
    static_groups: bool = Field(
        True,
        description="GPTQ: fix group qparams from the original weights before act-order, so groups stay consecutive "
        "columns (no g_idx); defaults to false when act_order is off.",
    )
    damp: float = Field(
        0.01, gt=0, lt=1, description="GPTQ damping, fraction of mean(diag(H)) (0.01: measured, benchmarks/RESULTS.md)."
    )
    block_size: int = Field(128, ge=1, description="GPTQ lazy-batch width.")
    reorder: Literal["none", "group"] = Field(
        "none",
        description="GPTQ: 'group' = group-aware reordering (GPTQModel's default): groups by decreasing largest "
        "Hessian diagonal, columns within a group by decreasing diagonal; groups stay consecutive columns (no "
        "g_idx). Turns the act_order default off; setting it with act_order: true is an error.",
    )
    group_range: Literal["current", "block_start"] = Field(
        "current",
        description="GPTQ: a group's range from its weights with every error update so far ('current'), or as at "
        "the start of its lazy block of block_size columns ('block_start', as AutoGPTQ/GPTQModel do).",
    )
    mse: bool = Field(
        False, description="Search each group's range shrink minimizing sum abs(fake_quant(w) - w)^mse_norm (GPTQ, RTN)."
    )
    mse_grid: int = Field(100, ge=1, description="MSE search: shrink ratios 1 - i/mse_grid.")
    mse_max_shrink: float = Field(0.2, gt=0, lt=1, description="MSE search: ratios tried down to 1 - mse_max_shrink.")
    mse_norm: float = Field(2.4, gt=0, description="MSE search: exponent of the error.")
    true_sequential: bool = Field(
        True, description="Quantize q/k/v, o, gate/up, down in order, each seeing the earlier ones quantized."
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Module names or suffixes left in full precision.",
    )
    awq_grid: int = Field(20, ge=1, description="AWQ: scale exponents tried, alpha = i/awq_grid for i < awq_grid.")
    awq_search_samples: int | None = Field(
        4,
        ge=1,
        description="AWQ scale search: windows (evenly spaced over the calibration set) on which a consumer "
        "module such as attention or the MLP is run for every candidate; null = all. A consumer that is one "
        "of the group's linears is measured exactly on every token through the input Gram matrix.",
    )
    awq_search_objective: Literal["consumer", "linears"] = Field(
        "consumer",
        description="AWQ scale search objective: consumer (the output error of the module that takes the "
        "group's input, e.g. attention or the MLP, as in the AWQ paper) or linears (the summed output error of "
        "the group's own linears, exact over every token through the input Gram matrix; far cheaper).",
    )
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
    moe_calibrate_all_experts: bool = Field(
        True,
        description="Mixture-of-experts: every calibration token goes through every expert for the experts' "
        "statistics (the block's output keeps the router's choice); false: each expert sees only its routed tokens.",
    )
    moe_experts_per_pass: int | Literal["auto"] = Field(
        "auto",
        description="Mixture-of-experts with true_sequential: routed experts observed and solved per pass, so a "
        "worker holds only that many experts' Hessians (the router reruns per pass; results are the same). auto: "
        "every expert in one pass, unless the plan says the run would not fit cluster.worker_memory, then the "
        "most that fit (a multiple of cluster.workers).",
    )
    moe_min_tokens: int = Field(
        128, ge=1,
        description="Mixture-of-experts: an expert whose statistics hold fewer tokens than this is quantized by RTN "
        "instead (the block's report.json record lists it under experts.rtn_fallback, with a note).",
    )

    @field_validator("bits")
    @classmethod
    def _bits_range(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"must be between 2 and 8, got {v}")
        return v

    @field_validator("moe_experts_per_pass")
    @classmethod
    def _per_pass(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError(f"must be auto or a positive number of experts, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"must be -1 (per channel) or a positive number of columns, got {v}")
        return v

    @model_validator(mode="after")
    def _orders(self) -> QuantConfig:
        given = self.model_fields_set
        if self.reorder == "group" and self.act_order:
            if "act_order" in given:
                raise ValueError("quant: reorder 'group' and act_order true exclude each other; pick one")
            self.__dict__["act_order"] = False  # the default yields to an explicit reorder
        if not self.act_order and self.static_groups and "static_groups" not in given:
            self.__dict__["static_groups"] = False  # the static default belongs to act-order
        return self

    @property
    def weight_preset(self) -> Preset | None:
        """The `quant.scheme` preset's weight side, or None (integer weights from the explicit keys)."""
        return None if self.scheme is None else preset(self.scheme)

    @property
    def kind(self) -> str:
        """The weight quantizer family: int, fp8, nvfp4 or mxfp4."""
        p = self.weight_preset
        return "int" if p is None else p.kind

    @property
    def activations(self) -> str | None:
        """How input activations are quantized (the preset's words), or None: they are not."""
        p = self.weight_preset
        return None if p is None or self.weights_only else p.activations

    @property
    def static_inputs(self) -> bool:
        """Whether the inputs take calibrated parameters (FP8's `input_scale`, NVFP4's
        `input_global_scale`), as the preset table says (torch-free)."""
        p = self.weight_preset
        return p is not None and not self.weights_only and bool(p.input_params)

    @property
    def needs_calibration(self) -> bool:
        """Whether the run needs calibration activations: every method observes them but round
        to nearest, which needs them only for SmoothQuant's or static inputs' scales (FP8,
        NVFP4). A data-free run reads no calibration text and streams no calibration windows."""
        if self.method == "none":
            return False
        return self.method != "rtn" or self.smoothquant is not None or self.static_inputs

    @model_validator(mode="after")
    def _preset(self) -> QuantConfig:
        if self.scheme is None:
            if self.weights_only:
                raise ValueError("quant.weights_only: needs quant.scheme (a preset whose activations it drops)")
            _check_smoothquant(self)
            return self
        try:
            p = preset(self.scheme)
        except ValueError as e:
            raise ValueError(f"quant.scheme: {e}") from None
        name = self.scheme.upper()
        self.__dict__["scheme"] = name
        if self.activations and self.method in AWQ_METHODS:
            raise ValueError(
                f"quant.method: {self.method} is for weight-only schemes, and {name} also quantizes input "
                "activations; use rtn or gptq (with quant.smoothquant), or set quant.weights_only: true"
            )
        if p.strategy not in SUPPORTED_STRATEGIES[p.kind]:
            raise ValueError(f"quant.scheme: {name}'s {p.strategy} weight scales are not implemented yet")
        given = self.model_fields_set
        _refine(self, name, p, given)
        if self.activations and not self.symmetric:
            raise ValueError(f"quant.symmetric: {name} quantizes activations too, with symmetric weights only")
        _check_smoothquant(self)
        return self


def _check_smoothquant(q: QuantConfig) -> None:
    if q.smoothquant is None:
        return
    if not q.activations:
        raise ValueError(
            "quant.smoothquant: needs a quant.scheme that quantizes input activations (W8A8, FP8_DYNAMIC, ...) "
            "without quant.weights_only"
        )
    if q.method not in ("rtn", "gptq"):
        raise ValueError(f"quant.smoothquant: works with quant.method rtn or gptq, not {q.method}")


def _refine(q: QuantConfig, name: str, p: Preset, given: set[str]) -> None:
    """Check the explicit keys against preset ``p`` and fill in the ones not given."""
    if "bits" in given and q.bits != p.bits:
        raise ValueError(f"quant.bits: {q.bits} contradicts quant.scheme {name} ({p.bits}-bit weights); drop one")
    if p.weight_type == "float":
        if "group_size" in given and q.group_size != p.group_size:
            raise ValueError(
                f"quant.group_size: {q.group_size} contradicts quant.scheme {name}, whose format fixes it "
                f"at {p.group_size}; drop it"
            )
        if "symmetric" in given and not q.symmetric:
            raise ValueError(f"quant.symmetric: float scheme {name} is symmetric only")
        if q.method in AWQ_METHODS:
            raise ValueError(f"quant.method: {q.method} is not implemented for float scheme {name}; use rtn or gptq")
        if q.mse:
            raise ValueError(f"quant.mse: the range search is for integer schemes, not {name}")
        if q.method in GPTQ_METHODS and q.act_order and not q.static_groups:
            raise ValueError(f"quant.static_groups: float scheme {name} with act_order needs static groups")
    for key, value in (("bits", p.bits), ("group_size", p.group_size), ("symmetric", p.symmetric)):
        if key not in given:
            q.__dict__[key] = value


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
    tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks (loglikelihood, multiple_choice, "
        "loglikelihood_rolling), computed blockwise on the fp and quantized model; needs the `eval` extra. "
        "Harness task names load their data from the hub; tasks in eval.task_paths work offline."
    )
    task_paths: list[str] = Field(
        default_factory=list, description="Folders or files of local lm-eval task YAMLs (the harness's include_path)."
    )
    task_limit: int | None = Field(None, ge=1, description="Documents per task (the harness's limit); null = all.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per task; null = each task's default.")
    task_max_length: int | None = Field(
        None, ge=2, description="Tokens a task request may feed the model (longer ones lose their left end); "
        "null = the model's context length, as the harness reads it from config.json."
    )


BLOCK_SHARDS = "block"
OTHER_SHARD_SIZE = "2GB"  # shard_size: block caps the shards outside the blocks at this


class ExportConfig(_Section):
    format: Literal["compressed-tensors", "gptq", "awq", "fake"] = Field(
        "compressed-tensors",
        description="Checkpoint layout written to output/model: compressed-tensors (packed, loads in "
        "transformers and vLLM), gptq (GPTQ v1), awq (AWQ GEMM), fake (dequantized floats, for "
        "debugging; the default when quant.method is none).",
    )
    shard_size: str = Field(
        BLOCK_SHARDS, description="`block`: one shard per block, the block's state file itself (a hard link, so the "
        "checkpoint is written once and the disk never holds it twice), and the tensors outside the blocks in shards "
        f"of at most {OTHER_SHARD_SIZE}; or the maximum bytes per shard, e.g. 500MB, 5GB (the shards are then written "
        "again from the block state files at the end)."
    )

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        if v != BLOCK_SHARDS:
            try:
                parse_size(v)
            except ValueError as e:
                raise ValueError(f"{e}, or '{BLOCK_SHARDS}'") from None
        return v

    @property
    def block_shards(self) -> bool:
        """Whether each block's state file becomes its shard (`shard_size: block`)."""
        return self.shard_size == BLOCK_SHARDS


class ClusterConfig(_Section):
    backend: str = Field(
        "local", description="Executor: local (one process), ray (actors on a Ray cluster), or another installed "
        "`shardquant.executors` entry point."
    )
    address: str | None = Field(
        None, description="Ray cluster address (e.g. 'auto', '10.0.0.1:6379'); unset: $RAY_ADDRESS, else a local Ray."
    )
    workers: int = Field(1, ge=1, description="Ray workers (actors), each holding a share of the samples.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Ray worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs reserved per Ray worker (model.device auto uses it).")
    placement: Literal["spread", "pack"] = Field(
        "spread", description="Placement-group strategy for the workers: spread over nodes, or pack."
    )
    activation_memory: str | None = Field(
        "auto", description="Per-worker memory for activations (e.g. 8GB); beyond it they spill to disk. null: no cap; "
        "auto: no cap, unless the plan says the run would not fit cluster.worker_memory, then the cap that fits."
    )
    worker_memory: str | None = Field(
        None, description="Memory per worker (GPU memory on CUDA, else host RAM), e.g. 80GB: the budget the auto "
        "settings are chosen for. Unset: a local CUDA device's total memory, else none (auto keeps everything on).",
    )
    spill_dir: str | None = Field(None, description="Local directory for spilled activations (default: the temp dir).")
    spill: Literal["auto", "none", "disk", "aio"] = Field(
        "auto", description="How activations beyond cluster.activation_memory go to cluster.spill_dir, read back one "
        "batch ahead of the compute: disk (plain files), aio (DeepSpeed's async I/O with pinned buffers: pip install "
        "'shardquant[deepspeed]' and apt-get install libaio-dev), auto (aio where DeepSpeed and libaio are present and "
        "the spill directory is on a local file system, else disk), none (never spill: a run whose activations exceed "
        "an explicit cluster.activation_memory is refused before any weight is read)."
    )
    max_failures: int = Field(3, ge=0, description="Lost Ray workers replaced (and their block redone) before giving up.")
    row_split: Literal["auto", "never", "always"] = Field(
        "auto", description="Ray, 2+ workers: GPTQ solves of one linear split by output rows over several workers "
        "(each reduces and factorizes the full Hessian, solves its rows; same result as one solve). auto: a linear "
        "whose column loop (out x in^2) exceeds the average load per worker goes to ceil(that / average) workers; "
        "never: every linear whole on one worker; always: every GPTQ linear over all workers."
    )

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        from importlib.metadata import entry_points

        names = {"local", "ray"} | {ep.name for ep in entry_points(group="shardquant.executors")}
        if v not in names:
            raise ValueError(f"not an installed executor (installed: {', '.join(sorted(names))})")
        return v

    @field_validator("activation_memory", "worker_memory")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and v != "auto":
            parse_size(v)
        return v


class WandbConfig(_Section):
    mode: Literal["disabled", "offline", "online"] = Field("disabled", description="W&B tracking: disabled (no import, no network), offline (local files under output/wandb), online.")
    project: str = Field("shardquant", description="W&B project.")


class TrackingConfig(_Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class KernelsConfig(_Section):
    mode: Literal["auto", "triton", "torch"] = Field(
        "auto",
        description="Triton kernels (GPTQ's block solve, AWQ's fake-quant) or their plain-torch references: "
        "auto = the kernels on a CUDA device when triton imports, else torch; triton = always the kernels "
        "(an error where triton cannot run); torch = always the references. report.json `kernels` says which ran.",
    )


class RunConfig(_Section):
    model: ModelConfig
    calib: CalibConfig = Field(default_factory=CalibConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    output: str = Field("runs/latest", description="Run directory.")
    resume: bool = Field(
        False,
        description="Require an interrupted run in output and continue it (a rerun of the same config resumes anyway).",
    )

    @model_validator(mode="after")
    def _default_export(self) -> RunConfig:
        if self.quant.method == "none" and "format" not in self.export.model_fields_set:
            self.export.format = "fake"  # nothing is quantized, so nothing to pack
        if self.quant.kind != "int" and self.cluster.row_split == "always":
            raise ValueError(
                f"cluster.row_split: always cannot split quant.scheme {self.quant.scheme} (its scales span "
                "rows: NVFP4's global scale, fp8 blocks); use auto or never"
            )
        if self.quant.activations and self.cluster.backend != "local" and self.calib.propagate == "fp":
            raise ValueError(
                f"calib.propagate: fp on {self.cluster.backend} runs pipeline stages, which do not quantize "
                f"activations yet (quant.scheme {self.quant.scheme}); use propagate: quantized or quant.weights_only"
            )
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
    if value * _UNITS[unit] >= 2**63:  # also inf: 1E400 parses as a float
        raise ValueError(f"'{text}' is too large")
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
    if len(shown) > 80:
        shown = shown[:77] + "..."
    if not loc:
        return f"invalid config: {msg}"
    if msg.startswith((loc + ":", loc + ".")):
        return msg
    return f"{loc}: {msg} (got {shown})"


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: e.g. a date like 2001-13-45
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
    except OSError as e:
        raise UserError(f"config file '{p}' cannot be read: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as e:
        line = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            line = f" at line {mark.line + 1}"
        elif isinstance(e, RecursionError):
            line = " (nested too deeply)"
        elif isinstance(e, ValueError) and not isinstance(e, UnicodeDecodeError):
            line = f" ({e})"  # a scalar YAML cannot construct, e.g. the date 2001-13-45
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
        _set_dotted(tree, key, _deep_copy(value))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_error(e)) from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load CONFIG.yaml and apply CLI overrides (list of args or a parsed mapping)."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return build_config(load_yaml(path), overrides)


_MAX_DEPTH, _MAX_NODES = 32, 100_000


def _deep_copy(tree: Any, budget: list[int] | None = None, depth: int = 0) -> Any:
    """Copy a YAML tree with string keys; UserError for a recursive alias or an absurd size
    (YAML aliases can make a short file expand to billions of nodes)."""
    budget = [_MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if depth > _MAX_DEPTH or budget[0] < 0:
        raise UserError("config is nested too deeply or too large (a recursive or exploding YAML alias?)")
    if isinstance(tree, dict):
        return {str(k): _deep_copy(v, budget, depth + 1) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v, budget, depth + 1) for v in tree]
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
