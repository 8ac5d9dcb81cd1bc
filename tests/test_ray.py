"""The Ray executor on a real local Ray (127.0.0.1): same results as the local executor,
data parallel over two actors, a lost actor replaced mid-run."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import read_checkpoint, run_config, save_tiny_model

from shardquant import pipeline
from shardquant.cluster import make_executor
from shardquant.cluster.ray_executor import ZERO_COPY, assign
from shardquant.config import RunConfig
from shardquant.errors import UserError


def quantize(cfg, **kw):
    """The pipeline with the cluster's executors, as the CLI runs a `cluster.backend: ray` config."""
    return pipeline.quantize(cfg, executors=make_executor, **kw)

ray = pytest.importorskip("ray")  # in the test extras; a missing Ray fails the import in CI's install


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module: 2 CPUs, loopback only, no dashboard."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": dict(ZERO_COPY)})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """A 6-block llama, so a run has blocks before and after a fault."""
    return save_tiny_model(tmp_path_factory.mktemp("deep") / "llama", "llama", layers=6, shard="200KB")


def _cfg(model, texts, out, **kw) -> RunConfig:
    kw.setdefault("export", {"format": "fake"})
    return RunConfig.model_validate(run_config(model, texts, out, **kw))


TWO = {"backend": "ray", "workers": 2, "cpus_per_worker": 0.5}


def test_assign_balances_cost():
    owner = assign([9.0, 1.0, 1.0, 4.0, 4.0], 2)
    loads = [sum(c for c, o in zip([9.0, 1.0, 1.0, 4.0, 4.0], owner, strict=True) if o == k) for k in range(2)]
    assert sorted(loads) == [9.0, 10.0]


@pytest.fixture(scope="module")
def local_runs(tiny_models, texts, tmp_path_factory):
    """The local executor's run per (method, propagate), computed once."""
    cache: dict[tuple[str, str], tuple[dict, dict]] = {}

    def get(method: str, propagate: str):
        if (method, propagate) not in cache:
            out = tmp_path_factory.mktemp(f"local-{method}-{propagate}")
            rep = quantize(_cfg(tiny_models["llama"], texts, out, quant={"method": method, "bits": 4,
                                         "group_size": 32}, calib={"propagate": propagate}), show_progress=False)
            cache[method, propagate] = rep, read_checkpoint(out / "model")
        return cache[method, propagate]

    return get


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("propagate", ["quantized", "fp"])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_match_local(ray_local, local_runs, tiny_models, texts, tmp_path, one_thread, method, propagate,
                             workers):
    """Samples split over 1, 2 or 3 actors, statistics reduced exactly: the same tensors as one
    process (RTN bit for bit; GPTQ/AWQ up to float summation order)."""
    local, a = local_runs(method, propagate)
    cluster = {"backend": "ray", "workers": workers, "cpus_per_worker": 0.5}
    dist = quantize(_cfg(tiny_models["llama"], texts, tmp_path / "ray", cluster=cluster,
                                  quant={"method": method, "bits": 4, "group_size": 32},
                                  calib={"propagate": propagate}), show_progress=False)
    assert dist["cluster"]["workers"] == [f"w{k}" for k in range(workers)]
    assert len(dist["cluster"]["peak_rss_bytes"]) == workers
    assert dist["ppl"]["fp"] == pytest.approx(local["ppl"]["fp"], rel=1e-5)
    b = read_checkpoint(tmp_path / "ray" / "model")
    assert a.keys() == b.keys()
    if propagate == "fp":
        # Pipeline stages: block i on stage k of its contiguous range, on every sample, as one
        # process would do it: the same bytes for every method.
        assert dist["cluster"]["mode"] == "stages"
        n = len(dist["blocks"])
        owners = [b["worker"] for b in sorted(dist["blocks"], key=lambda b: b["index"])]
        from shardquant.tools.plan import split_range

        assert owners == [f"w{k}" for k in range(workers) for _ in range(*split_range(n, workers, k))]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert dist["ppl"]["quantized"] == local["ppl"]["quantized"]
        return
    assert dist["cluster"]["mode"] == "data"
    assert all(b["worker"] == ",".join(dist["cluster"]["workers"]) for b in dist["blocks"])
    if method == "rtn":
        assert all(torch.equal(a[k], b[k]) for k in a)
        return
    linears = [k for k in a if k.endswith("_proj.weight")]
    total = sum(a[k].numel() for k in linears)
    same = sum(int((a[k] == b[k]).sum()) for k in linears)
    assert same / total >= 0.999, f"{total - same} of {total} weights differ"
    assert dist["ppl"]["quantized"] == pytest.approx(local["ppl"]["quantized"], rel=2e-3)


def test_one_worker_is_bytewise_local(ray_local, tiny_models, texts, tmp_path, one_thread):
    cfg = {"quant": {"method": "gptq", "bits": 4, "group_size": 16, "act_order": True, "static_groups": False}, "export": {"format": "gptq"}}
    quantize(_cfg(tiny_models["qwen3"], texts, tmp_path / "local", **cfg), show_progress=False)
    quantize(_cfg(tiny_models["qwen3"], texts, tmp_path / "ray", cluster={"backend": "ray"}, **cfg),
                      show_progress=False)
    files = sorted(p.name for p in (tmp_path / "local" / "model").glob("*.safetensors"))
    assert files
    for name in files:
        assert (tmp_path / "local" / "model" / name).read_bytes() == (tmp_path / "ray" / "model" / name).read_bytes()


def test_fp_stages_calibrate_at_once(ray_local, deep_llama, texts, tmp_path, one_thread):
    """Two stages of three blocks each: after the fp streams pass through, both stages
    calibrate at the same time (their block intervals overlap) and the result is the local
    run's, bit for bit."""
    calib = {"propagate": "fp", "n_samples": 32}
    local = quantize(_cfg(deep_llama, texts, tmp_path / "l", calib=calib), show_progress=False)
    dist = quantize(_cfg(deep_llama, texts, tmp_path / "r", calib=calib,
                                  cluster={"backend": "ray", "workers": 2, "cpus_per_worker": 1}),
                             show_progress=False)
    st = dist["cluster"]["stages"]
    assert set(st["busy"]) == {"w0", "w1"}
    by_stage = {w: [b for b in dist["blocks"] if b["worker"] == w] for w in ("w0", "w1")}
    assert [b["index"] for b in by_stage["w0"]] == [0, 1, 2] and [b["index"] for b in by_stage["w1"]] == [3, 4, 5]
    # stage 1's first block starts before stage 0's last block ends: both busy at once
    assert by_stage["w1"][0]["start"] < by_stage["w0"][-1]["end"]
    assert st["two_or_more_busy"] > 0
    assert dist["ppl"] == local["ppl"]
    a, b = read_checkpoint(tmp_path / "l" / "model"), read_checkpoint(tmp_path / "r" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _worker_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith(("ray::RayBlockWorker", "ray::BlockWorker", "ray::StageWorker"))]


@pytest.mark.parametrize("propagate", ["quantized", "fp"])
def test_killed_worker_is_replaced_and_output_identical(ray_local, deep_llama, texts, tmp_path, one_thread,
                                                         propagate):
    """kill -9 of one of two actors in the middle of the run (data parallel, or pipeline
    stages): replaced, unfinished blocks redone, same bytes."""
    calib = {"propagate": propagate}
    base = _cfg(deep_llama, texts, tmp_path / "clean", cluster=TWO, calib=calib)
    quantize(base, show_progress=False)
    progress = tmp_path / "faulty" / "state" / "progress.json"
    killed: list[int] = []

    def killer():
        import json
        import os
        import signal

        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if json.loads(progress.read_text())["done"] >= 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        pids = _worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    th = threading.Thread(target=killer)
    th.start()
    report = quantize(_cfg(deep_llama, texts, tmp_path / "faulty", cluster=TWO, calib=calib),
                               show_progress=False)
    th.join()
    assert killed, "no worker process was found to kill"
    faults = report["cluster"]["faults"]
    assert len(faults) == 1 and 2 <= faults[0]["block"] < 6 and faults[0]["recovery_s"] >= 0
    for f in sorted((tmp_path / "clean" / "model").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "faulty" / "model" / f.name).read_bytes(), f.name


def test_impossible_placement_is_a_clear_error(ray_local, tiny_models, texts, tmp_path):
    t = time.time()
    with pytest.raises(UserError, match=r"cluster\.workers: cannot place 4 workers"):
        quantize(_cfg(tiny_models["llama"], texts, tmp_path / "x",
                               cluster={"backend": "ray", "workers": 4, "cpus_per_worker": 1}), show_progress=False)
    assert time.time() - t < 30


def test_activations_spill_to_disk_under_a_budget(tiny_models, texts, tmp_path, one_thread):
    """A tiny activation budget: batches go to disk and come back exact (same checkpoint)."""
    free = quantize(_cfg(tiny_models["llama"], texts, tmp_path / "a"), show_progress=False)
    spill = tmp_path / "spill"
    spill.mkdir()
    capped = quantize(
        _cfg(tiny_models["llama"], texts, tmp_path / "b", cluster={"activation_memory": "20KB", "spill_dir": str(spill)}),
        show_progress=False,
    )
    assert capped["ppl"] == free["ppl"]
    for f in sorted((tmp_path / "a" / "model").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / "model" / f.name).read_bytes()
    assert not list(spill.rglob("*.safetensors"))  # cleaned up


def test_unreachable_address_is_a_clear_error_fast(tiny_models, texts, tmp_path):
    import socket
    import subprocess
    import sys

    import yaml

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["llama"], texts, tmp_path / "out",
                                             cluster={"backend": "ray", "address": f"127.0.0.1:{port}"})))
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "shardquant", "quantize", str(cfg), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert time.time() - t < 30
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"shardquant: error: cluster.address: cannot reach Ray at '127.0.0.1:{port}'")


@pytest.mark.parametrize("propagate", ["quantized", "fp"])
def test_driver_killed_then_rerun_finishes_with_same_bytes(ray_local, deep_llama, texts, tmp_path, one_thread,
                                                           propagate):
    """kill -9 of the driver process of a Ray run (data parallel, or pipeline stages); the same
    command resumes and matches an uninterrupted Ray run byte for byte."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import yaml

    address = ray_local.get_runtime_context().gcs_address
    calib = {"propagate": propagate}
    clean = quantize(_cfg(deep_llama, texts, tmp_path / "clean", cluster=TWO, calib=calib),
                              show_progress=False)
    assert clean["cluster"]["workers"] == ["w0", "w1"]
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(deep_llama, texts, out, export={"format": "fake"}, calib=calib,
                                             cluster=TWO | {"address": address})))
    argv = [sys.executable, "-m", "shardquant", "quantize", str(cfg), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    progress = out / "state" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(progress.read_text())["done"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    for f in sorted((tmp_path / "clean" / "model").glob("*.safetensors")):
        assert f.read_bytes() == (out / "model" / f.name).read_bytes(), f.name
