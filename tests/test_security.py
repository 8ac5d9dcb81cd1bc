"""Security: no pickle loading anywhere in the package, no checkpoint code run unless
`model.trust_remote_code` is set, and nothing a checkpoint names can make a run read outside
the model directory or write outside `output`."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_config
from safetensors.torch import load_file, save_file

from shardquant.cli import main
from shardquant.config import build_config
from shardquant.errors import UserError
from shardquant.model.checkpoint import CheckpointIndex

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("runner", "algorithms", "kernels", "cluster")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all",
               "Loader", "UnsafeLoader", "FullLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Every way `source` could unpickle data or run checkpoint code, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            names = {a.name for a in node.names}
            if top in PICKLE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if node.module == "torch" and "load" in names:
                found.append(f"{where}: from torch import load (call it as torch.load(..., weights_only=True))")
            if node.module == "yaml" and names & UNSAFE_YAML:
                found.append(f"{where}: from yaml import {sorted(names & UNSAFE_YAML)}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}

            def is_true(key: str, kw=kw) -> bool:
                return isinstance(kw.get(key), ast.Constant) and kw[key].value is True

            if name == "torch.load" and not is_true("weights_only"):
                found.append(f"{where}: torch.load without weights_only=True")
            if name.startswith("yaml.") and name.split(".", 1)[1] in UNSAFE_YAML:
                found.append(f"{where}: {name} (use yaml.safe_load)")
            if name in ("np.load", "numpy.load") and "allow_pickle" in kw and not (
                isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False
            ):
                found.append(f"{where}: {name} with allow_pickle")
            if name.endswith("read_pickle") or name in ("eval", "exec"):
                found.append(f"{where}: {name}(...)")
            if is_true("trust_remote_code"):
                found.append(f"{where}: trust_remote_code=True hard-coded (it must come from model.trust_remote_code)")
    return found


def test_scanner_catches_every_pattern():
    """The scan below is only as good as this: each unsafe form is flagged, safe forms are not."""
    bad = """
import pickle
import cloudpickle as cp
from dill import loads
from torch import load
from yaml import unsafe_load
torch.load(path)
torch.load(path, weights_only=False)
torch.load(path, weights_only=flag)
yaml.load(text, Loader=yaml.Loader)
yaml.full_load(text)
np.load(path, allow_pickle=True)
pd.read_pickle(path)
eval(text)
AutoConfig.from_pretrained(path, trust_remote_code=True)
"""
    flagged = {int(hit.split(":")[1]) for hit in unsafe_loads(bad)}
    assert flagged == set(range(2, len(bad.splitlines()) + 1)), unsafe_loads(bad)  # every line but the first (blank)
    good = """
torch.load(path, weights_only=True, map_location="cpu")
yaml.safe_load(text)
np.load(path)
np.load(path, allow_pickle=False)
model.eval()
AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
"""
    assert unsafe_loads(good) == []


def test_package_never_unpickles():
    files = [p for d in PACKAGE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    found = [hit for p in files for hit in unsafe_loads(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert found == []


# --- remote code -----------------------------------------------------------------------------

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("checkpoint code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "llama"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def model_with_remote_code(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of a llama fixture whose config and tokenizer ask for code shipped in the dir."""
    shutil.copytree(src, dst)
    (dst / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    return dst


def test_remote_code_is_not_run_by_default(tmp_path, tiny_models, texts, capsys):
    """trust_remote_code defaults to off: the run uses transformers' own Llama and never imports
    the checkpoint's evil.py."""
    marker = tmp_path / "ran.txt"
    model = model_with_remote_code(tiny_models["llama"], tmp_path / "m", marker)
    cfg = run_config(model, texts, tmp_path / "out", quant={"method": "rtn"}, eval={"enabled": False},
                     calib={"n_samples": 4, "seq_len": 32})
    assert build_config(cfg).model.trust_remote_code is False
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["quantize", str(tmp_path / "run.yaml"), "--quiet"]) == 0, capsys.readouterr().err
    assert not marker.exists()
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_remote_code_runs_only_when_trusted(tmp_path, tiny_models):
    """The positive control of the test above: with the flag set, the same dir's code runs (so
    the marker would have shown it). In a subprocess, with transformers' module cache in tmp."""
    marker = tmp_path / "ran.txt"
    model = model_with_remote_code(tiny_models["llama"], tmp_path / "m", marker)
    code = (
        "import sys; from shardquant.model.source import ModelSource; "
        "s = ModelSource(sys.argv[1], trust_remote_code=True); print(type(s.skeleton).__name__)"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["EvilModel"]
    assert marker.read_text() == "checkpoint code ran"


class _Payload:
    """A pickle that, when loaded, writes a file: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def test_pickle_weights_are_refused_unread(tmp_path, tiny_models, texts, capsys):
    marker = tmp_path / "unpickled.txt"
    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["qwen2"] / f, d / f)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config(d, texts, tmp_path / "out")))
    assert main(["quantize", str(tmp_path / "run.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds only pickle weights (*.bin/*.pt); shardquant reads safetensors only" in err[0]
    assert not marker.exists()


# --- paths a checkpoint names ------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "../outside.safetensors", "{abs}", "sub/model.safetensors", "..\\outside.safetensors", "..", "",
    "a\x00b.safetensors",
])
def test_index_cannot_name_files_outside_the_model_dir(tmp_path, tiny_models, texts, capsys, name):
    """A weight_map naming a path is refused with one line, even when that path holds a valid
    shard (so it is the check that refuses it, not a missing file)."""
    d = shutil.copytree(tiny_models["qwen2"], tmp_path / "models" / "m")
    (d / "sub").mkdir()
    for target in (tmp_path / "models" / "outside.safetensors", d / "sub" / "model.safetensors"):
        shutil.copy(d / "model.safetensors", target)
    name = name.replace("{abs}", str(tmp_path / "models" / "outside.safetensors"))
    tensors = sorted(load_file(d / "model.safetensors"))
    weight_map = dict.fromkeys(tensors, "model.safetensors")
    weight_map[tensors[0]] = name
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    out = tmp_path / "out"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config(d, texts, out)))
    assert main(["quantize", str(tmp_path / "run.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "which is not a file name inside the model dir" in err[0], err
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(UserError, match="not a file name inside the model dir"):
        CheckpointIndex(d)


def test_a_run_writes_only_inside_output(tmp_path, tiny_models, texts, capsys):
    """A checkpoint whose extra tensor is named like a path: a whole run (with W&B offline)
    creates files under `output` and nowhere else; the name stays a tensor name."""
    d = shutil.copytree(tiny_models["qwen2"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    evil = "../../../escaped.safetensors"
    tensors[evil] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    cfg = run_config(d, texts, out, quant={"method": "rtn"}, calib={"n_samples": 4, "seq_len": 32},
                     tracking={"wandb": {"mode": "offline"}})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    before = {p for p in tmp_path.rglob("*")}
    assert main(["quantize", str(tmp_path / "run.yaml"), "--quiet"]) == 0, capsys.readouterr().err
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == out or out in p.parents for p in created), sorted(
        str(p) for p in created if not (p == out or out in p.parents))
    assert not list(tmp_path.rglob("escaped*")) and not Path("/escaped.safetensors").exists()
    exported = {}
    for f in (out / "model").glob("*.safetensors"):
        exported.update(load_file(f))
    assert evil in exported
