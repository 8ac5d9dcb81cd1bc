"""`shardquant inspect DIR`: what a checkpoint directory holds, read from its config.json and
safetensors headers only (plus the few bytes of compressed-tensors' `weight_shape` tensors).

Formats: `compressed-tensors`, `gptq`, `awq` (from `quantization_config` and the tensors),
`fake` (float weights on a quantization grid: the run's report.json beside the checkpoint
says so, or every sampled (row, group) of a block linear holds at most 2**bits distinct values)
and `unquantized`. Headers are validated by `checkpoint.CheckpointIndex`, so a missing,
truncated or corrupt shard is one UserError line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shardquant.config import GPTQ_METHODS
from shardquant.errors import UserError
from shardquant.export.formats import PACKED, Layout, Scheme
from shardquant.model.checkpoint import CheckpointIndex, TensorInfo
from shardquant.presets import PRESETS

KEY = "inspect"
FLOAT_DTYPES = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16}
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Linear:
    """One linear layer of the checkpoint: its shape, how it is stored, its bytes."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    bits: int  # bits per weight as stored (16 or 32 for float weights)
    group_size: int | None
    bytes: int


@dataclass
class Summary:
    """What `shardquant inspect` prints."""

    path: str
    format: str
    scheme: Scheme
    bytes_on_disk: int
    safetensors_bytes: int
    shards: int
    tensors: int
    linears: list[Linear] = field(default_factory=list)
    not_quantized: list[str] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict:
        out = asdict(self)
        if self.scheme.kind is None:
            del out["scheme"]["kind"]  # integer schemes: the keys as before float formats came
        if self.scheme.activations is None:
            del out["scheme"]["activations"]  # weight-only schemes: the keys as before
        out["linears"] = [asdict(lin) | {"shape": list(lin.shape)} for lin in self.linears]
        out["layer_types"] = [asdict(t) for t in layer_types(self.linears)]
        return out


@dataclass(frozen=True)
class LayerType:
    """Linears that differ only in their block index, aggregated."""

    name: str
    count: int
    shape: tuple[int, int]
    bits: int
    group_size: int | None
    bytes: int


def layer_types(linears: list[Linear]) -> list[LayerType]:
    """Aggregate linears by name with the block index replaced by `*` (first-seen order);
    linears of one type that differ in shape or scheme stay apart."""
    groups: dict[tuple, list[Linear]] = {}
    for lin in linears:
        key = (_BLOCK_INDEX.sub(".*.", lin.name, count=1), lin.shape, lin.bits, lin.group_size)
        groups.setdefault(key, []).append(lin)
    return [
        LayerType(name, len(ls), shape, bits, group, sum(x.bytes for x in ls))
        for (name, shape, bits, group), ls in groups.items()
    ]


def resolve_dir(path: str | Path) -> Path:
    """The checkpoint directory: DIR itself, or DIR/model for a run directory."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{KEY}: '{p}' is not a directory")
    if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        p = p / "model"
    if not (p / "config.json").is_file():
        raise UserError(f"{KEY}: '{p}' has no config.json (not a checkpoint or run directory)")
    return p


def read_config(root: Path) -> dict:
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise UserError(f"{KEY}: '{root / 'config.json'}' is not valid JSON") from None
    if not isinstance(config, dict):
        raise UserError(f"{KEY}: '{root / 'config.json'}' is not a JSON object")
    return config


def declared_format(qc: object) -> str | None:
    """The packed format a `quantization_config` declares (None: none or unknown)."""
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "")).lower()
    return method if method in PACKED else None


def packed_linear(layout: type[Layout], prefix: str, index: CheckpointIndex, scheme: Scheme) -> Linear:
    """Shape, bits, group and bytes of the packed linear `prefix` from its tensors' headers
    (read as the format's layout says)."""
    infos = {s: index.infos[f"{prefix}.{s}"] for s in layout.siblings if f"{prefix}.{s}" in index.infos}
    bits = scheme.bits or 4
    marker = infos[layout.marker].shape
    if len(marker) != 2:
        raise UserError(f"{KEY}: tensor '{prefix}.{layout.marker}' is not 2-D")
    stored = layout.shape_tensor and _weight_shape(index, f"{prefix}.{layout.shape_tensor}")
    out_f, in_f = stored or layout.linear_shape(marker, bits)
    scales = infos.get(layout.scales)
    n_groups = None if scales is None or len(scales.shape) != 2 else scales.shape[layout.groups_dim]
    group = -1 if n_groups == 1 else (math.ceil(in_f / n_groups) if n_groups else scheme.group_size)
    if scheme.kind is not None and scheme.group_size is not None:
        group = scheme.group_size  # fp8 blocks: the scales' columns are blocks, as declared
    return Linear(prefix, (out_f, in_f), bits, group, sum(i.end - i.start for i in infos.values()))


def _weight_shape(index: CheckpointIndex, name: str) -> tuple[int, int] | None:
    """A stored int64 [2] (out, in), compressed-tensors' `weight_shape` (16 bytes read from the shard)."""
    info = index.infos.get(name)
    if info is None or info.dtype != "I64" or info.shape != (2,):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(index.files[name]), framework="pt") as f:
            out_f, in_f = (int(v) for v in f.get_tensor(name).tolist())
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"{KEY}: cannot read '{index.files[name].name}': {str(e).splitlines()[0]}") from None
    return out_f, in_f


def float_linears(index: CheckpointIndex) -> list[str]:
    """Names (without `.weight`) of the 2-D float weights inside numbered blocks."""
    return [
        n.removesuffix(".weight") for n in index.names()
        if n.endswith(".weight") and _BLOCK_INDEX.search(n) and len(index.infos[n].shape) == 2
        and index.infos[n].dtype in FLOAT_DTYPES
    ]


def float_linear(name: str, info: TensorInfo, scheme: Scheme) -> Linear:
    bits = FLOAT_DTYPES[info.dtype]
    return Linear(name, (info.shape[0], info.shape[1]), bits, scheme.group_size, info.end - info.start)


def grid_scheme(index: CheckpointIndex, name: str, max_rows: int = 64) -> Scheme | None:
    """The (bits, group) a float weight sits on, if any: the fewest bits b such that, for some
    group size g with 2**b <= g / 2 (so random floats could not pass), every sampled
    (row, group) holds at most 2**b distinct values. None when the weight is not on a grid."""
    from safetensors import safe_open

    try:
        with safe_open(str(index.files[name]), framework="pt") as f:
            w = f.get_slice(name)[:max_rows].float()
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"{KEY}: cannot read '{index.files[name].name}': {str(e).splitlines()[0]}") from None
    in_f = w.shape[1]
    best: Scheme | None = None
    for g in sorted({in_f, *(2**k for k in range(4, 12))}, reverse=True):
        if g > in_f or in_f % g:
            continue
        groups = w.reshape(w.shape[0], in_f // g, g)
        distinct = max(len(set(row.tolist())) for row in groups.reshape(-1, g))
        bits = max(1, math.ceil(math.log2(max(distinct, 2))))
        if 2 <= bits <= 8 and 2**bits <= g // 2 and (best is None or bits < best.bits):
            best = Scheme(bits, -1 if g == in_f else g, None, None)
    return best


def _run_report(root: Path) -> dict | None:
    """report.json of the run whose export `root` is, if it is one."""
    path = root.parent / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        if Path(report["export"]["path"]).resolve() == root.resolve():
            return report
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass
    return None


def inspect_checkpoint(path: str | Path) -> Summary:
    """Read a checkpoint directory (or a run directory holding model/) and summarize it."""
    root = resolve_dir(path)
    config = read_config(root)
    index = CheckpointIndex(root, key=KEY)
    files = [p for p in root.iterdir() if p.is_file()]
    shards = sorted({p.name for p in index.files.values()})
    summary = Summary(
        path=str(root), format="unquantized", scheme=Scheme(),
        bytes_on_disk=sum(p.stat().st_size for p in files),
        safetensors_bytes=sum((root / s).stat().st_size for s in shards),
        shards=len(shards), tensors=len(index.infos),
    )
    qc = config.get("quantization_config")
    fmt = declared_format(qc)
    if fmt is not None:
        layout = PACKED[fmt].reader(qc)
        summary.format, summary.scheme = fmt, layout.declared_scheme(qc)
        marker = layout.marker
        prefixes = [
            n.removesuffix(f".{marker}") for n in index.names()
            if n.endswith(f".{marker}") and layout.marker_dtype in (None, index.infos[n].dtype)
        ]
        if not prefixes:
            raise UserError(f"{KEY}: config.json declares '{fmt}' but no tensor ends in '.{marker}'")
        summary.linears = [packed_linear(layout, p, index, summary.scheme) for p in prefixes]
        quantized = set(prefixes)
        summary.not_quantized = [n for n in float_linears(index) if n not in quantized]
        if "lm_head.weight" in index.infos:
            summary.not_quantized.append("lm_head")
        return summary
    if isinstance(qc, dict):
        summary.note = f"unknown quantization_config (quant_method {qc.get('quant_method')!r}): listed as float"
    names = float_linears(index)
    report = _run_report(root)
    if report is not None and report.get("export", {}).get("format") == "fake":
        q = report.get("config", {}).get("quant", {})
        if q.get("method", "none") != "none":
            summary.format = "fake"
            act = bool(q.get("act_order")) and q.get("method") in GPTQ_METHODS  # RTN/AWQ: no order
            preset = PRESETS.get(str(q.get("scheme")).upper())
            kind = preset.kind if preset is not None and preset.kind != "int" else None
            inputs = preset.activations if preset is not None and not q.get("weights_only") else None
            summary.scheme = Scheme(q.get("bits"), q.get("group_size"), q.get("symmetric"), act, kind, inputs)
            summary.note = "scheme from the run's report.json"
    elif names and not isinstance(qc, dict):
        grid = grid_scheme(index, f"{names[0]}.weight")
        if grid is not None:
            summary.format, summary.scheme = "fake", grid
            summary.note = f"float weights on a {grid.bits}-bit grid (estimated from {names[0]})"
    summary.linears = [float_linear(n, index.infos[f"{n}.weight"], summary.scheme) for n in names]
    return summary


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def render(summary: Summary, *, all_layers: bool = False) -> str:
    """The human-readable report: header lines, then a table of layer types (or of every
    linear with `all_layers`)."""
    s = summary
    fmt = "fake (float)" if s.format == "fake" else s.format
    lines = [
        f"checkpoint: {s.path}",
        f"format:     {fmt}",
        f"scheme:     {s.scheme.describe()}",
        f"size:       {_size(s.bytes_on_disk)} on disk ({s.bytes_on_disk} bytes; safetensors "
        f"{s.safetensors_bytes}) in {s.shards} shard{'s' if s.shards != 1 else ''}, {s.tensors} tensors",
    ]
    if s.note:
        lines.append(f"note:       {s.note}")
    if s.not_quantized:
        shown = ", ".join(s.not_quantized[:6]) + (f", ... ({len(s.not_quantized)})" if len(s.not_quantized) > 6 else "")
        lines.append(f"float:      {shown}")
    title = "quantized linears" if s.format in PACKED else "linears"
    lines.append(f"{title}: {len(s.linears)}, {_size(sum(x.bytes for x in s.linears))}")
    if not s.linears:
        return "\n".join(lines)
    if all_layers:
        rows = [(x.name, "", x.shape, x.bits, x.group_size, x.bytes) for x in s.linears]
        header = ("linear", "", "out x in", "bits", "group", "bytes")
    else:
        rows = [(t.name, str(t.count), t.shape, t.bits, t.group_size, t.bytes) for t in layer_types(s.linears)]
        header = ("layer type", "count", "out x in", "bits", "group", "bytes")
    cells = [header] + [
        (n, c, f"{shape[0]} x {shape[1]}", str(b), "-" if g is None else str(g), str(nb))
        for n, c, shape, b, g, nb in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(6)]
    lines.append("")
    for r in cells:
        parts = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 6) if widths[i]]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
