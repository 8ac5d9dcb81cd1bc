"""Fuzzing the loaders with hypothesis: whatever a config file, an override or a checkpoint
header holds, the outcome is a valid result or one clear line (UserError / exit 2), never a
traceback. Inputs tried per target are printed in the terminal summary ("fuzz inputs tried").
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from conftest import FUZZ_COUNTS
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from shardquant.cli import main
from shardquant.config import RunConfig, load_config, reference_rows
from shardquant.errors import UserError
from shardquant.model.checkpoint import CheckpointIndex, read_header
from shardquant.model.source import ModelSource

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KEYS = [k for k, _, _ in reference_rows()]
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
# Values that reach interesting code: YAML's implicit types (dates, special floats), sizes,
# enum neighbours, paths with separators and NULs, YAML syntax pieces. Not 'ray': a valid
# cluster.backend=ray must not start a cluster from a fuzz test.
ODD = [
    "", "~", "null", "true", "no", "0", "-1", "1e400", ".nan", "-.inf", "0x1F", "0o17", "1_000",
    "2001-12-14", "2001-13-45", "2001-02-30t25:61:61", "12:30:45", "4GB", "0MB", "-3GB", "1.5GiB",
    "gptq", "GPTQ", "awq+gptq", "fp", "quantized", "float16", "cuda:99", "../../etc/passwd",
    "/dev/null", "a\x00b", "[lm_head, down_proj]", "{a: 1}", "[", "{", "&a [*a]", "*a", "!!binary AAAA",
    "!!python/object/apply:os.system ['true']", "!!set {a, b}", "'unterminated", "- - -", "? x",
    "%YAML 1.1", "|\n  x", "9" * 5000, "é", "\u2028", "a: b: c",
]
scalar = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(ODD)
)
yaml_tree = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(SECTIONS + KEYS) | st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)
dotted_key = st.sampled_from(KEYS) | st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.=-0123456789 ", max_size=6), min_size=1, max_size=3
).map(".".join)


def count(name: str) -> None:
    FUZZ_COUNTS[name] = FUZZ_COUNTS.get(name, 0) + 1


class Accepted(Exception):
    """Raised by the patched pipeline: the CLI got a valid config and would start the run."""


def cli(argv: list[str]) -> tuple[str, list[str]]:
    """Run the real `main()` with the pipeline stubbed out; ('accepted'|'refused', stderr lines)."""
    err = io.StringIO()
    with mock.patch("shardquant.pipeline.quantize", side_effect=Accepted), contextlib.redirect_stderr(err):
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except Accepted:
                return "accepted", []
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert code == 2, (argv, code, err.getvalue())
    assert len(lines) == 1 and lines[0].startswith("shardquant: error: "), (argv, err.getvalue())
    return "refused", lines


def base_config(tmp: Path) -> dict:
    return {"model": {"path": str(tmp / "no-model")}, "calib": {"path": "calib.txt"}, "output": str(tmp / "out")}


# --- config files -----------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600))
@example(b"a: 2001-13-45\n")
@example(b"[" * 3000)
@example(b"model: &a [*a]\n")
@example(b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
         b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
         b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
         b"model: {path: x}\nquant: {ignore: *f}\n")
@example(b"\xff\xfe\x00m")
@example(b"model:\n  path: x\n  \x00: 1\n")
@example(b"!!python/object/apply:os.system ['touch /tmp/pwned']")
def test_config_file_bytes(tmp_path, data):
    """Any bytes as the config file: a RunConfig or one UserError line."""
    count("config file (random bytes)")
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    try:
        assert isinstance(load_config(path, []), RunConfig)
    except UserError as e:
        assert len(str(e).splitlines()) == 1


@FUZZ
@given(yaml_tree, st.lists(st.tuples(st.sampled_from(KEYS), yaml_tree), max_size=4))
def test_config_file_yaml_documents(tmp_path, doc, patches):
    """Random YAML documents, and a valid config with random values at real keys, through the CLI."""
    count("config file (YAML documents)")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    cli(["quantize", str(path), "--quiet"])
    cfg = base_config(tmp_path)
    for key, value in patches:
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    cli(["quantize", str(path), "--quiet"])


@FUZZ
@given(st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"%@`#,?\n\t .~0123456789abkeymodlpathquant")), max_size=80))
def test_config_file_yaml_syntax(tmp_path, text):
    """YAML-syntax soup (anchors, tags, flow collections, block scalars) as the config file."""
    count("config file (YAML syntax soup)")
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    cli(["quantize", str(path), "--quiet"])


# --- overrides ----------------------------------------------------------------------------

override = (
    st.tuples(dotted_key, scalar.map(str) | st.text(max_size=20)).map(lambda kv: [f"--{kv[0]}={kv[1]}"])
    | st.tuples(dotted_key, st.text(max_size=20)).map(lambda kv: [f"--{kv[0]}", kv[1]])
    | st.text(max_size=12).map(lambda s: [s])
)


def _not_argparse_own(tokens: list[str]) -> bool:
    # -h/--help print help and exit 0; --quiet=X and --help=X are argparse's own usage errors.
    return not any(t in ("-h", "--help") or t.startswith(("--quiet=", "--help=")) for t in tokens)


@FUZZ
@given(st.lists(override, max_size=5).map(lambda groups: [t for g in groups for t in g]).filter(_not_argparse_own))
@example(["--output=2001-13-45"])
@example(["--quant.ignore=&a [*a]"])
@example(["--export.shard_size=a\nb"])
@example(["--quant.bits"])
@example(["--model.path.x=1"])
@example(["--=3"])
@example(["--quant..bits=3"])
@example(["--qu=3"])
@example(["--quant.bits=" + "9" * 5000])
@example(["--calib.n_samples", "--quant.bits=3"])
def test_cli_overrides(tmp_path, tokens):
    """Random `--a.b=c` / `--a.b c` / junk arguments after a valid config."""
    count("CLI overrides")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path)))
    cli(["quantize", str(path), "--quiet", *tokens])


# --- safetensors headers and indexes ---------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F64"]
entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES) | scalar,
        "shape": st.lists(st.integers(min_value=0, max_value=6), max_size=3) | scalar,
        "data_offsets": st.lists(st.integers(min_value=-2, max_value=400), min_size=2, max_size=2) | scalar,
    }
)


def _consistent(tensors: list[tuple[str, str, list[int]]]) -> dict:
    """A header whose offsets follow the shapes, back to back (a well-formed start)."""
    from shardquant.model.checkpoint import _DTYPE_BYTES

    header, off = {}, 0
    for name, dtype, shape in tensors:
        n = _DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    return header


header_doc = (
    st.lists(st.tuples(st.text(max_size=8), st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)),
             max_size=4).map(_consistent)
    | st.dictionaries(st.text(max_size=8), entry, max_size=4)
    | st.dictionaries(st.just("__metadata__") | st.text(max_size=4), yaml_tree, max_size=3)
    | yaml_tree
)


def _check_accepted(path: Path, infos: dict) -> None:
    """A header read_header accepts must load with the safetensors library, tensor by tensor."""
    size = path.stat().st_size
    for info in infos.values():
        assert 0 <= info.start <= info.end <= size
    src = SimpleNamespace(index=SimpleNamespace(files=dict.fromkeys(infos, path)), key="model.path")
    try:
        tensors = ModelSource.read_tensors(src, list(infos))
    except UserError as e:
        pytest.fail(f"read_header accepted {path.name} but loading it failed: {e}")
    for name, info in infos.items():
        assert tuple(tensors[name].shape) == info.shape


def _read(path: Path) -> None:
    try:
        infos = read_header(path)
    except UserError as e:
        assert len(str(e).splitlines()) == 1
        return
    _check_accepted(path, infos)


@FUZZ
@given(header_doc, st.integers(min_value=-64, max_value=64), st.booleans(), st.binary(max_size=8))
def test_safetensors_headers(tmp_path, doc, data_delta, pad, junk):
    """Random and almost-right headers, with too few / too many data bytes after them."""
    count("safetensors headers (JSON)")
    raw = json.dumps(doc).encode() + (b" " * 7 if pad else b"")
    need = max([e["data_offsets"][1] for e in doc.values() if isinstance(e, dict)
                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                and isinstance(e["data_offsets"][1], int)] or [0]) if isinstance(doc, dict) else 0
    data = bytes(max(0, min(need + data_delta, 4096)))
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data + (junk if data_delta > 60 else b""))
    _read(path)


@FUZZ
@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=300))
@example(8, b"{}")
@example(2, b"{}")
@example(2**64 - 1, b"{}")
@example(100 * 2**20 + 1, b"{}")
def test_safetensors_length_prefix(tmp_path, n, body):
    """Any 8-byte length prefix in front of any bytes."""
    count("safetensors length prefixes")
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", n) + body)
    _read(path)


@pytest.fixture(scope="module")
def real_shard(tmp_path_factory) -> bytes:
    """A real safetensors file (the library's own writer) to truncate and corrupt."""
    d = tmp_path_factory.mktemp("st")
    g = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(8, 4, generator=g), "b": torch.arange(6, dtype=torch.int32),
               "c": torch.ones(3, dtype=torch.bfloat16)}, str(d / "x.safetensors"), metadata={"format": "pt"})
    return (d / "x.safetensors").read_bytes()


@FUZZ
@given(st.data())
def test_safetensors_truncated_and_flipped(tmp_path, real_shard, data):
    """A real file cut anywhere, or with bytes overwritten anywhere (header or data)."""
    count("safetensors files (truncated / bytes flipped)")
    blob = bytearray(real_shard)
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    for _ in range(data.draw(st.integers(0, 4))):
        if blob:
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(blob))
    _read(path)


UNSAFE_NAMES = ["../../etc/passwd", "/etc/passwd", "sub/model.safetensors", "..\\model.safetensors",
                "..", ".", "", "a\x00b.safetensors"]


@FUZZ
@given(st.dictionaries(st.text(max_size=6), st.sampled_from(["model.safetensors", *UNSAFE_NAMES]) | scalar,
                       max_size=4) | yaml_tree,
       st.booleans())
def test_checkpoint_index(tmp_path, real_shard, weight_map, wrap):
    """Random weight maps (junk values, path-traversal names) in model.safetensors.index.json."""
    count("safetensors index files")
    (tmp_path / "model.safetensors").write_bytes(real_shard)
    doc = {"metadata": {}, "weight_map": weight_map} if wrap else weight_map
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(doc))
    unsafe = wrap and isinstance(weight_map, dict) and any(v in UNSAFE_NAMES for v in weight_map.values())
    try:
        index = CheckpointIndex(tmp_path)
    except UserError as e:
        assert len(str(e).splitlines()) == 1
        return
    assert not unsafe, f"an index naming {weight_map} was accepted"
    assert all(p == tmp_path / "model.safetensors" for p in index.files.values())
