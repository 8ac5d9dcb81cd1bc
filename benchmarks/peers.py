"""GPTQ against its peers on SmolLM2-135M: llm-compressor, GPTQModel and shardquant, side by side.

Each peer is installed in its own cached venv under ``~/.cache/shardquant/peers/`` (built on
first use, outside git; only installed and run, never copied into the project):

- ``llmcompressor``: ``llmcompressor==0.14.*`` (it pins transformers<=5.17).
- ``gptqmodel``: the pure-Python ``gptqmodel==7.7.*`` sdist with ``--no-deps``, its
  requirements installed under a constraints file pinning torch==2.13.0 (it asks for a newer
  torch); run with ``GPTQMODEL_CPU_WORKERS=2`` and ``dtype=torch.float32``.

Protocol: the same calibration windows for everyone (``--calib`` x ``--seq-len`` tokens at
seeded random offsets of the four calibration plays, cut by shardquant's own ``token_windows``
and written to ``calib_ids.json``, which the peers read; shardquant cuts the same windows from
the same config). Every run is its own process: calibration wall time is the time of the
quantization call (the model load excluded; shardquant: ``timing.calibrate_s``), peak RSS is
the process's (``wait4``). Each peer's result is written as a dense fp32 HF checkpoint of its
dequantized weights, and all of them (and the fp model) are evaluated by one evaluator,
``shardquant eval``, on the same ``--eval`` x ``--seq-len`` windows of Macbeth.

Usage:
    python benchmarks/peers.py [--peers llmcompressor,gptqmodel,ours] [--schemes sym,asym]
        [--methods gptq,awq] [--awq] [--ours KEY=VALUE ...] [--setup-only] [--work DIR]

``--awq`` (or ``--methods awq``) adds llm-compressor's AWQ and shardquant's ``awq`` (slow:
~1,700 s for the peer; GPTQModel has no AWQ here).
``--ours quant.damp=0.05 --ours quant.reorder=group`` sets shardquant's options (repeatable).
``--variant lin:quant.awq_search_objective=linears`` adds a shardquant run with those options
beside the default one (repeatable; ``NAME:KEY=VALUE[,KEY=VALUE...]``), in the same invocation
and so against the same peer runs. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import yaml

ROOT = Path(__file__).resolve().parent.parent

PEERS_DIR = Path(os.environ.get("SHARDQUANT_PEERS", Path.home() / ".cache" / "shardquant" / "peers"))
TORCH = "torch==2.13.0"
LLMC_SPEC = "llmcompressor==0.14.*"
GPTQMODEL_SPEC = "gptqmodel==7.7.*"


# --- venvs --------------------------------------------------------------------------------


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *args], check=True)


def ensure_venv(name: str) -> Path:
    """The peer's venv, built once (a ``.complete`` marker is written last)."""
    venv = PEERS_DIR / name
    if (venv / ".complete").is_file():
        return venv
    print(f"[peers] building the {name} venv in {venv} (minutes, once)", flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(venv, TORCH)
    if name == "llmcompressor":
        _pip(venv, LLMC_SPEC)
    elif name == "gptqmodel":
        with tempfile.TemporaryDirectory(dir=PEERS_DIR) as tmp:
            t = Path(tmp)
            subprocess.run(
                [str(venv / "bin" / "pip"), "download", "-q", "--no-deps", "--no-binary", ":all:",
                 GPTQMODEL_SPEC, "-d", str(t)],
                check=True,
            )
            sdist = next(t.glob("gptqmodel-*.tar.gz"))
            subprocess.run(["tar", "xzf", str(sdist), "-C", str(t)], check=True)
            reqs = next(t.glob("gptqmodel-*/requirements.txt")).read_text().splitlines()
            (t / "req.txt").write_text("\n".join(r for r in reqs if not r.startswith("torch>")) + "\n")
            (t / "cons.txt").write_text(TORCH + "\n")
            _pip(venv, "-r", str(t / "req.txt"), "-c", str(t / "cons.txt"))
            _pip(venv, "--no-deps", str(sdist))
    else:
        raise ValueError(name)
    (venv / ".complete").write_text("ok\n")
    return venv


# --- peer scripts (run inside the peers' venvs) ---------------------------------------------

_DENSE_SAVE = '''
def save_dense(src, weights, out):
    """src's checkpoint with the given linear weights (fp32), written to out with its tokenizer.
    Plain safetensors edits: no model is instantiated (peers patch transformers' loading)."""
    import shutil
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    src, out = Path(src), Path(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    left = {name + ".weight": w for name, w in weights.items()}
    for f in sorted(src.glob("*.safetensors")):
        sd = load_file(f)
        for key in list(sd):
            if key in left:
                assert sd[key].shape == left[key].shape, (key, sd[key].shape, left[key].shape)
                sd[key] = left.pop(key).to(torch.float32).contiguous()
        save_file(sd, out / f.name, metadata={"format": "pt"})
    assert not left, sorted(left)[:5]
    return len(weights)
'''

LLMC_SCRIPT = _DENSE_SAVE + '''
import json, resource, sys, time
import torch
args = json.loads(sys.argv[1])
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

torch.manual_seed(0)
if not torch.cuda.is_available():
    # Its AWQ pins cached activations, which needs an accelerator; on a CPU-only machine
    # pinning has nothing to do, so it is made a no-op here (the peer's code is untouched).
    torch.Tensor.pin_memory = lambda self, *a, **k: self
ids = json.load(open(args["calib"]))
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
weights = {"num_bits": args["bits"], "type": "int", "symmetric": args["sym"], "strategy": "group",
           "group_size": args["group"]}
if args["method"] == "awq":
    from llmcompressor.modifiers.awq import AWQModifier
    recipe = AWQModifier(ignore=["lm_head"], config_groups={"g": {"targets": ["Linear"], "weights": weights}})
else:
    recipe = GPTQModifier(ignore=["lm_head"], config_groups={"g": {"targets": ["Linear"], "weights": weights}})
t = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=len(ids[0]),
        num_calibration_samples=len(ids), shuffle_calibration_samples=False)
calib_s = time.perf_counter() - t

from compressed_tensors.quantization.lifecycle import fake_quantize
deq, drift = {}, 0.0
for name, m in model.named_modules():
    if hasattr(m, "weight_scale") and isinstance(m, torch.nn.Linear):
        # static act-order (llm-compressor's default) keeps groups in column order: no g_idx
        q = fake_quantize(m.weight.data, m.weight_scale, getattr(m, "weight_zero_point", None),
                          m.quantization_scheme.weights)
        drift = max(drift, float((q - m.weight.data).abs().max()))
        deq[name] = q.detach().float()
n = len(deq)
for name, m in model.named_modules():
    if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
        deq[name] = m.weight.detach().float()  # AWQ folds its scales into the norms
save_dense(args["model"], deq, args["out"])
mods = recipe if isinstance(recipe, list) else [recipe]  # its AWQModifier expands to several modifiers
settings = {}
for mod in mods:
    for key in ("dampening_frac", "actorder", "n_grid", "duo_scaling"):
        if hasattr(mod, key):
            settings[key] = str(getattr(mod, key))
print("RESULT " + json.dumps({"calib_s": calib_s, "linears": n, "requant_drift": drift,
      "modifiers": [type(m).__name__ for m in mods], "settings": settings}))
'''

GPTQMODEL_SCRIPT = _DENSE_SAVE + '''
import os
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import json, sys, time
import torch
args = json.loads(sys.argv[1])
from gptqmodel import GPTQModel, QuantizeConfig

torch.manual_seed(0)
if not torch.cuda.is_available():
    # Its AWQ pins cached activations, which needs an accelerator; on a CPU-only machine
    # pinning has nothing to do, so it is made a no-op here (the peer's code is untouched).
    torch.Tensor.pin_memory = lambda self, *a, **k: self
ids = json.load(open(args["calib"]))
calib = [{"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)} for r in ids]
qcfg = QuantizeConfig(bits=args["bits"], group_size=args["group"], sym=args["sym"])
model = GPTQModel.load(args["model"], qcfg, dtype=torch.float32)
t = time.perf_counter()
model.quantize(calib, batch_size=1)
calib_s = time.perf_counter() - t
# Quantized modules are offloaded (meta) after quantize(): read the saved checkpoint back.
from pathlib import Path
from safetensors.torch import load_file
qdir = Path(args["out"]).parent / "gptq-checkpoint"
model.save(str(qdir))
qc = json.loads((qdir / "quantize_config.json").read_text())
fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
sd = {}
for f in sorted(qdir.glob("*.safetensors")):
    sd.update(load_file(f))
bits = qc["bits"]
maxq, shifts = 2**bits - 1, torch.arange(0, 32, bits, dtype=torch.int32)
deq = {}
for key in [k for k in sd if k.endswith(".qweight")]:
    name = key[: -len(".qweight")]
    qw, qz = sd[key], sd[name + ".qzeros"]
    codes = ((qw.unsqueeze(1) >> shifts.view(1, -1, 1)) & maxq).reshape(-1, qw.shape[1])  # [in, out]
    zeros = ((qz.unsqueeze(2) >> shifts.view(1, 1, -1)) & maxq).reshape(qz.shape[0], -1)  # [groups, out]
    if fmt == "gptq":  # v1 stores zero - 1
        zeros = zeros + 1
    g = sd[name + ".g_idx"].long()
    w = (codes - zeros[g]).float() * sd[name + ".scales"].float()[g]
    deq[name] = w.T.contiguous()
if not deq:
    raise SystemExit("no quantized modules in the saved checkpoint")
n = save_dense(args["model"], deq, args["out"])
print("RESULT " + json.dumps({"calib_s": calib_s, "linears": n, "settings": {
    "damp_percent": qcfg.damp_percent, "act_group_aware": qcfg.act_group_aware, "desc_act": qcfg.desc_act,
    "mse": getattr(qcfg, "mse", None), "checkpoint_format": fmt,
    "g_idx_trivial": all(torch.equal(sd[k], torch.arange(sd[k].numel(), dtype=sd[k].dtype) // args["group"])
                         for k in sd if k.endswith(".g_idx"))}}))
'''


# --- running ------------------------------------------------------------------------------


_WRAPPER = """
import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[1:])
_, status, ru = os.wait4(p.pid, 0)
print("RSS " + json.dumps({"rss": ru.ru_maxrss * 1024, "rc": os.waitstatus_to_exitcode(status)}))
"""


def measured(cmd: list[str], env: dict[str, str] | None, log: Path) -> tuple[int, float, int, str]:
    """Run ``cmd`` (stderr to ``log``, in ``log``'s folder: peers write log folders into their
    working directory) under a tiny wrapper that reads its peak RSS with wait4.

    Returns (exit code, wall s, peak RSS bytes of the process and its reaped children, stdout).
    Dirty pages are written back first (``os.sync``), so no run pays, in its own fsyncs, for
    the writeback of the checkpoint the run before it left in the page cache.
    """
    os.sync()
    t = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", _WRAPPER, *cmd], stdout=subprocess.PIPE, stderr=err, text=True, env=env,
            cwd=log.parent,
        )
    wall = time.perf_counter() - t
    rc, rss = proc.returncode, 0
    for line in proc.stdout.splitlines():
        if line.startswith("RSS "):
            info = json.loads(line[4:])
            rss, rc = info["rss"], info["rc"]
    return rc, wall, rss, proc.stdout


def result_line(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError("no RESULT line")


def prepare_windows(work: Path, calib_path: Path, model: Path, n: int, seq_len: int, seed: int) -> Path:
    """Cut the calibration windows with shardquant's own reader and write their token ids."""
    from transformers import AutoTokenizer

    from shardquant.data import load_text, token_windows

    tok = AutoTokenizer.from_pretrained(model)
    text = load_text(calib_path, key="calib.path")
    ids = token_windows(tok, text, n_samples=n, seq_len=seq_len, seed=seed, mode="random", key="calib")
    path = work / "calib_ids.json"
    path.write_text(json.dumps(ids.tolist()))
    return path


class PeerRun(NamedTuple):
    """What a side-by-side benchmark shares: see `prepare_run`."""

    work: Path
    model: Path
    calib_path: Path
    eval_path: Path
    protocol: dict[str, Any]
    calib_ids: Path


def prepare_run(args: argparse.Namespace, prefix: str) -> PeerRun:
    """The work dir (``--work`` or a fresh temp dir), the SmolLM2 model, the calibration and
    evaluation texts, our run protocol and the calibration windows' token ids handed to the
    peers, from ``--calib``, ``--eval`` and ``--seq-len``."""
    from _common import smollm2_protocol

    from shardquant.tools.assets import shakespeare_split, smollm2_dir

    work = Path(args.work or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    model = smollm2_dir()
    calib_path, eval_path = shakespeare_split()
    protocol = smollm2_protocol(calib_n=args.calib, eval_n=args.eval, seq_len=args.seq_len)
    calib_ids = prepare_windows(work, calib_path, model, args.calib, args.seq_len, protocol["calib"].get("seed", 0))
    return PeerRun(work, model, calib_path, eval_path, protocol, calib_ids)


def evaluate(model_dir: Path, eval_path: Path, n: int, seq_len: int, out: Path) -> float:
    """Perplexity of a dense checkpoint by ``shardquant eval`` (the one evaluator for all)."""
    cfg = {
        "model": {"path": str(model_dir)},
        "eval": {"path": str(eval_path), "n_samples": n, "seq_len": seq_len, "batch_size": 4},
        "quant": {"method": "none", "group_size": -1},  # eval validates the scheme too
        "output": str(out),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "shardquant", "eval", str(out / "eval.yaml"), "--quiet"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"shardquant eval failed on {model_dir}:\n{proc.stderr[-2000:]}")
    return float(json.loads((out / "eval.json").read_text())["ppl"])


def run_peer(name: str, method: str, scheme: dict[str, Any], calib_ids: Path, model: Path, out: Path) -> dict[str, Any]:
    venv = ensure_venv(name)
    script = out / f"run_{name}.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(LLMC_SCRIPT if name == "llmcompressor" else GPTQMODEL_SCRIPT)
    args = {"model": str(model), "calib": str(calib_ids), "out": str(out / "model"), "method": method, **scheme}
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    rc, wall, rss, stdout = measured([str(venv / "bin" / "python"), str(script), json.dumps(args)], env, out / "log.txt")
    if rc != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{name} failed ({rc}); log {out / 'log.txt'}:\n{tail}")
    res = result_line(stdout)
    return {"calib_s": res["calib_s"], "rss": rss, "wall_s": wall, "model": out / "model", "info": res}


def run_ours(method: str, scheme: dict[str, Any], protocol: dict[str, Any], sets: list[str], out: Path) -> dict[str, Any]:
    cfg = json.loads(json.dumps(protocol))
    cfg["quant"] = {"method": method, "bits": scheme["bits"], "group_size": scheme["group"], "symmetric": scheme["sym"]}
    cfg["eval"]["enabled"] = False
    cfg["export"]["format"] = "fake"  # a dense checkpoint, evaluated like the peers'
    cfg["output"] = str(out / "run")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    overrides = [f"--{s}" for s in sets]
    cmd = [sys.executable, "-m", "shardquant", "quantize", str(out / "run.yaml"), "--quiet", *overrides]
    rc, wall, rss, _ = measured(cmd, None, out / "log.txt")
    if rc != 0:
        raise RuntimeError(f"shardquant failed ({rc}):\n{(out / 'log.txt').read_text()[-3000:]}")
    report = json.loads((out / "run" / "report.json").read_text())
    return {"calib_s": report["timing"]["calibrate_s"], "rss": rss, "wall_s": wall,
            "model": out / "run" / "model", "info": {"quant": report["config"]["quant"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", default="llmcompressor,gptqmodel,ours")
    ap.add_argument("--schemes", default="sym,asym")
    ap.add_argument("--awq", action="store_true", help="also AWQ (llm-compressor's takes ~1,700 s)")
    ap.add_argument("--methods", default="gptq", help="gptq, awq or gptq,awq (--awq adds awq)")
    ap.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                    help="shardquant override, e.g. quant.damp=0.05 (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="an extra shardquant run 'ours-NAME' with these overrides (repeatable)")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--setup-only", action="store_true")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in ("llmcompressor", "gptqmodel", "ours"):
            raise SystemExit(f"unknown peer {p!r}")
        if p != "ours":
            ensure_venv(p)
    if args.setup_only:
        return
    variants: dict[str, list[str]] = {}
    for v in args.variant:
        name, _, sets = v.partition(":")
        if not name or not sets:
            raise SystemExit(f"--variant: expected NAME:KEY=VALUE[,KEY=VALUE], got {v!r}")
        variants[f"ours-{name}"] = sets.split(",")

    work, model, calib_path, eval_path, protocol, calib_ids = prepare_run(args, "sq-peers-")
    print(f"work dir {work}; calibration {args.calib} x {args.seq_len} from {calib_path}; "
          f"eval {args.eval} x {args.seq_len} of {eval_path}", flush=True)
    fp = evaluate(model, eval_path, args.eval, args.seq_len, work / "eval-fp")
    print(f"fp perplexity {fp:.3f}", flush=True)

    methods = [m for m in args.methods.split(",") if m]
    if args.awq and "awq" not in methods:
        methods.append("awq")
    if not methods or set(methods) - {"gptq", "awq"}:
        raise SystemExit(f"--methods: expected gptq and/or awq, got {args.methods!r}")
    rows = []
    for method in methods:
        for sname in args.schemes.split(","):
            scheme = {"bits": args.bits, "group": args.group, "sym": sname == "sym"}
            results: dict[str, dict[str, Any]] = {}
            for p in [*peers, *variants]:
                if p == "gptqmodel" and method != "gptq":
                    continue
                tag = f"{method}-w{args.bits}g{args.group}{sname}-{p}"
                out = work / tag
                print(f"[{tag}] running ...", flush=True)
                if p == "ours" or p in variants:
                    r = run_ours(method, scheme, protocol, [*args.ours, *variants.get(p, [])], out)
                else:
                    r = run_peer(p, method, scheme, calib_ids, model, out)
                r["ppl"] = evaluate(r["model"], eval_path, args.eval, args.seq_len, out / "eval")
                results[p] = r
                print(f"[{tag}] calibration {r['calib_s']:.1f} s, peak RSS {r['rss'] / 2**30:.2f} GiB, "
                      f"ppl {r['ppl']:.3f} ({r['ppl'] / fp:.3f}x fp); {json.dumps(r['info'])}", flush=True)
            rows.append((method, sname, results))

    print(f"\nfp perplexity: {fp:.3f}\n")
    print("| method | scheme | peer | calibration s | peak RSS GiB | ppl | ppl/fp | ours/peer time | ours/peer ppl |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, sname, results in rows:
        ours = results.get("ours")
        for p, r in results.items():
            peer = ours and not p.startswith("ours")
            tr = f"{ours['calib_s'] / r['calib_s']:.2f}" if peer else ""
            pr = f"{ours['ppl'] / r['ppl']:.4f}" if peer else ""
            print(f"| {method} | w{args.bits}g{args.group} {sname} | {p} | {r['calib_s']:.1f} | "
                  f"{r['rss'] / 2**30:.2f} | {r['ppl']:.3f} | {r['ppl'] / fp:.3f} | {tr} | {pr} |")
    for method, sname, results in rows:
        for v in variants:
            for p, r in results.items():
                if v in results and not p.startswith("ours"):
                    mine = results[v]
                    print(f"{method} w{args.bits}g{args.group} {sname}: {v}/{p} time "
                          f"{mine['calib_s'] / r['calib_s']:.2f}, ppl {mine['ppl'] / r['ppl']:.4f}")


if __name__ == "__main__":
    main()
