"""The Ray executor on a real local Ray (127.0.0.1): same results as the local executor,
data parallel over two actors, a lost actor replaced mid-run."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch
from conftest import read_checkpoint, run_config, save_tiny_model

from shardquant import pipeline
from shardquant.calib.steps import SolveTask
from shardquant.cluster import make_executor, ray_executor
from shardquant.cluster.ray_executor import ZERO_COPY, RayExecutor, assign, solve_units
from shardquant.config import RunConfig
from shardquant.errors import UserError
from shardquant.execution import spill


def quantize(cfg, **kw):
    """The pipeline with the cluster's executors, as the CLI runs a `cluster.backend: ray` config."""
    return pipeline.quantize(cfg, executors=make_executor, **kw)


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


SHAPES = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "gate": (256, 64), "up": (256, 64),
          "down": (64, 256), "wide": (512, 64)}


def _units(tasks, world, mode="auto"):
    units, costs = solve_units(tasks, SHAPES, world, mode)
    for u, c in zip(units, costs, strict=True):
        out_f, in_f = SHAPES[u.linears[0]]
        rows = u.rows[1] - u.rows[0] if u.rows else sum(SHAPES[n][0] for n in u.linears)
        assert c == rows * in_f**2 + in_f**3  # column loop + factorization, per unit
    return [(u.linears, u.rows) for u in units]


def test_solve_units_split_only_what_exceeds_the_average_load():
    """The packing rule, without Ray: one worker keeps the tasks; more get one unit per linear,
    and a GPTQ linear whose column loop (out·in²) exceeds total cost / world is split into
    min(world, ceil(that / average)) row slices (`split_rows`)."""
    attn = [SolveTask("attn", ("q", "k", "v"), "gptq")]
    mlp = [SolveTask("mlp", ("gate", "up"), "gptq")]
    down = [SolveTask("down", ("down",), "gptq")]
    wide = [SolveTask("wide", ("wide",), "gptq")]
    for tasks in (attn, mlp, down, wide):
        assert _units(tasks, 1) == [(tasks[0].linears, None)]
        assert _units(tasks, 1, "always") == [(tasks[0].linears, None)]  # one worker: nothing to share
    # small linears, or ones whose factorization (in³) dominates: whole, one unit per linear
    for world in (2, 3):
        assert _units(attn, world) == [(("q",), None), (("k",), None), (("v",), None)]
        assert _units(down, world) == [(("down",), None)]
    # gate/up: column loop 1048576 each, total 2621440: under the average on 2, over it on 3
    assert _units(mlp, 2) == [(("gate",), None), (("up",), None)]
    assert _units(mlp, 3) == [(("gate",), (0, 128)), (("gate",), (128, 256)),
                              (("up",), (0, 128)), (("up",), (128, 256))]
    # a lone wide linear: ceil(2097152 / (2359296 / world)) = 2 on 2, 3 on 3 workers
    assert _units(wide, 2) == [(("wide",), (0, 256)), (("wide",), (256, 512))]
    assert _units(wide, 3) == [(("wide",), (0, 171)), (("wide",), (171, 342)), (("wide",), (342, 512))]
    assert _units(wide, 3, "never") == [(("wide",), None)]
    assert _units(attn, 3, "always") == [
        (("q",), (0, 22)), (("q",), (22, 43)), (("q",), (43, 64)),
        (("k",), (0, 6)), (("k",), (6, 11)), (("k",), (11, 16)),
        (("v",), (0, 6)), (("v",), (6, 11)), (("v",), (11, 16)),
    ]
    # only GPTQ kinds are split: RTN and AWQ stay whole; awq+gptq splits like gptq
    for kind in ("rtn", "awq"):
        assert _units([SolveTask("wide", ("wide",), kind)], 3, "always") == [(("wide",), None)]
    assert _units([SolveTask("wide", ("wide",), "awq+gptq")], 2) == _units(wide, 2)
    # the slices' costs balance: two slices of a linear go to two workers
    units, costs = solve_units(wide, SHAPES, 2)
    assert sorted(assign(costs, 2)) == [0, 1]


def test_row_slices_join_in_row_order():
    from shardquant.algorithms.quantizer import QuantSpec
    from shardquant.algorithms.rtn import quantize_rtn
    from shardquant.calib.steps import RowSlice, join_row_slices

    w = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=4, group_size=16)
    whole = quantize_rtn(w, spec)
    parts = [RowSlice(a, b, quantize_rtn(w[a:b], spec)) for a, b in [(4, 10), (0, 4)]]
    got = join_row_slices("x", parts, 10)
    for key in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(got, key), getattr(whole, key))
    with pytest.raises(ValueError, match="gap or overlap"):
        join_row_slices("x", parts[:1], 10)
    with pytest.raises(ValueError, match=r"cover rows \[0, 4\) of 10"):
        join_row_slices("x", parts[1:], 10)


@pytest.mark.parametrize(("workers", "act_order", "method"),
                         [(3, True, "awq+gptq")])  # an uneven 3-way split, act-order, AWQ's scales
def test_row_split_solves_export_the_same_bytes(ray_local, tiny_models, texts, tmp_path, one_thread,
                                                 monkeypatch, workers, act_order, method):
    """`cluster.row_split: always` (every GPTQ linear in row slices over the workers, each
    factorizing the full Hessian) exports the same bytes as `never` (each linear whole on one
    worker); losses are the sums of the slices'."""
    split: list[tuple[str, tuple[int, int]]] = []
    original = ray_executor.solve_units

    def spy(tasks, shapes, world, row_split="auto"):
        units, costs = original(tasks, shapes, world, row_split)
        split.extend((u.linears[0], u.rows) for u in units if u.rows is not None)
        return units, costs

    monkeypatch.setattr(ray_executor, "solve_units", spy)
    quant = {"method": method, "bits": 4, "group_size": 16, "act_order": act_order}
    reports = {}
    for mode in ("never", "always"):
        cluster = {"backend": "ray", "workers": workers, "cpus_per_worker": 0.5, "row_split": mode}
        reports[mode] = quantize(_cfg(tiny_models["llama"], texts, tmp_path / mode, cluster=cluster, quant=quant,
                                      export={"format": "gptq"}), show_progress=False)
        if mode == "never":
            assert split == []
    assert {name for name, _ in split} >= {"mlp.down_proj", "self_attn.q_proj"}
    assert {rows for _, rows in split if rows[0] == 0} >= {(0, 64 // workers + (64 % workers > 0))}
    files = sorted(p.name for p in (tmp_path / "never" / "model").glob("*.safetensors"))
    assert files
    for name in files:
        assert (tmp_path / "never" / "model" / name).read_bytes() == (tmp_path / "always" / "model" / name).read_bytes()
    assert reports["always"]["ppl"] == reports["never"]["ppl"]
    for a, b in zip(reports["never"]["blocks"], reports["always"]["blocks"], strict=True):
        assert a["loss"].keys() == b["loss"].keys()
        assert all(b["loss"][k] == pytest.approx(a["loss"][k], rel=1e-5) for k in a["loss"])


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


# Every method and both propagations on 2 workers; the uneven 3-way split once per method.
# One worker: test_one_worker_is_bytewise_local.
@pytest.mark.parametrize(("workers", "propagate", "method"), [
    *((2, p, m) for p in ("quantized", "fp") for m in ("rtn", "gptq", "awq")),
    (3, "quantized", "gptq"), (3, "fp", "awq"), (3, "quantized", "rtn"),
])
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
    for name in [*files, "manifest.json"]:  # the shards' sha256 in it come from the actors that wrote them
        assert (tmp_path / "local" / "model" / name).read_bytes() == (tmp_path / "ray" / "model" / name).read_bytes()


def test_fp_stages_calibrate_at_once(ray_local, deep_llama, texts, tmp_path, one_thread):
    """Two stages of three blocks each: after the fp streams pass through, both stages
    calibrate at the same time (their block intervals overlap) and the result is the local
    run's, bit for bit. The distributed run exports block shards: the state files the stage
    actors wrote become the shards."""
    calib = {"propagate": "fp", "n_samples": 32}
    local = quantize(_cfg(deep_llama, texts, tmp_path / "l", calib=calib), show_progress=False)
    dist = quantize(_cfg(deep_llama, texts, tmp_path / "r", calib=calib, export={"format": "fake", "shard_size": "block"},
                         cluster={"backend": "ray", "workers": 2, "cpus_per_worker": 1}),
                    show_progress=False)
    assert dist["export"]["shards"] == 7 and dist["export"]["adopted_shards"] == 6
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
    """This test process's Ray workers (ray.init here started the raylet, whose children they
    are): another Ray on the machine keeps its own."""
    import os

    import psutil

    me = os.getpid()
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith(("ray::RayBlockWorker", "ray::StageWorker"))
            and any(a.pid == me for a in p.parents())]


def _busy(pids: list[int]) -> int | None:
    """One of `pids` whose process is running an actor task, or None."""
    import psutil

    for pid in pids:
        try:
            title = psutil.Process(pid).cmdline()[0]
        except (psutil.Error, IndexError):
            continue
        if "." in title.removeprefix("ray::"):
            return pid
    return None


@pytest.mark.parametrize("propagate", ["quantized", "fp"])
def test_killed_worker_is_replaced_and_output_identical(ray_local, deep_llama, texts, tmp_path, one_thread,
                                                         propagate):
    """kill -9 of one of two actors in the middle of the run (data parallel, or pipeline
    stages): replaced, unfinished blocks redone, same bytes. The actors' pids are found
    while the first block runs, and once it is done the one killed is one running a task
    (Ray titles a busy actor's process `ray::Class.method()`): a stage that has finished
    its blocks would be found dead only at evaluation, after every block."""
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
        pids: list[int] = []
        while time.time() < deadline:
            try:
                done = json.loads(progress.read_text())["done"]
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            if len(pids) < 2:
                pids = _worker_pids()
            elif done >= 1 and (busy := _busy(pids)):
                os.kill(busy, signal.SIGKILL)
                killed.append(busy)
                return
            time.sleep(0.02)

    th = threading.Thread(target=killer)
    th.start()
    report = quantize(_cfg(deep_llama, texts, tmp_path / "faulty", cluster=TWO, calib=calib),
                               show_progress=False)
    th.join()
    assert killed, "no worker process was found to kill"
    faults = report["cluster"]["faults"]
    assert len(faults) == 1 and 1 <= faults[0]["block"] < 6 and faults[0]["recovery_s"] >= 0
    for f in sorted((tmp_path / "clean" / "model").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "faulty" / "model" / f.name).read_bytes(), f.name


@pytest.mark.timeout(120)
def test_impossible_placement_is_a_clear_error(ray_local, tiny_models, texts, tmp_path,
                                               monkeypatch):
    """4 workers of 1 CPU on a 2-CPU Ray: refused from the cluster's resources, before a
    placement group is requested (whose wait would time out only after a minute)."""
    import importlib

    # The module: ray.util's attribute of that name is the function.
    pg = importlib.import_module("ray.util.placement_group")
    requested, original = [], pg.placement_group
    monkeypatch.setattr(pg, "placement_group",
                        lambda *a, **kw: requested.append(a) or original(*a, **kw))
    four = {"backend": "ray", "workers": 4, "cpus_per_worker": 1}
    with pytest.raises(UserError, match=r"cannot place 4 workers of \{'CPU': 1(\.0)?\} .*CPU=2\b"):
        quantize(_cfg(tiny_models["llama"], texts, tmp_path / "x", cluster=four),
                 show_progress=False)
    assert requested == []
    assert ray.is_initialized()  # the caller's Ray is left running
    assert not (tmp_path / "x" / "state" / "blocks").exists()  # no block was calibrated


@pytest.fixture(scope="module")
def ray2_reference(ray_local, tiny_models, texts, tmp_path_factory):
    """Two actors, nothing spilled: the report and the exported tensors."""
    out = tmp_path_factory.mktemp("ray2-ref")
    rep = quantize(_cfg(tiny_models["llama"], texts, out, cluster=TWO), show_progress=False)
    return rep, read_checkpoint(out / "model")


NEEDS_AIO = pytest.mark.skipif(spill.aio_problem() is not None, reason=f"cluster.spill aio: {spill.aio_problem()}")


# Plain files on Ray are the local path in each actor: Ray is checked with aio.
@pytest.mark.parametrize(("backend", "mode"), [
    ("local", "disk"), pytest.param("local", "aio", marks=NEEDS_AIO), pytest.param("ray", "aio", marks=NEEDS_AIO),
])
def test_spilled_activations_export_the_same_bytes(request, local_runs, tiny_models, texts, tmp_path, one_thread,
                                                   backend, mode):
    """A budget of two batches (the rest spills, through plain files or
    DeepSpeed's async I/O, read one batch ahead): the exported tensors are bit for bit those
    of a run that holds everything in memory, in one process and on two actors; report.json
    records the backend and the bytes moved, which match what `plan` counts (one process),
    and the spill files are gone afterwards."""
    from shardquant.tools.plan import plan_from_config

    free, want = local_runs("gptq", "quantized") if backend == "local" else request.getfixturevalue("ray2_reference")
    spill_dir = tmp_path / "spill"
    cluster = {"activation_memory": "131072", "spill_dir": str(spill_dir), "spill": mode,
               **(TWO if backend == "ray" else {})}
    cfg = _cfg(tiny_models["llama"], texts, tmp_path / "out", cluster=cluster)
    capped = quantize(cfg, show_progress=False)
    got = read_checkpoint(tmp_path / "out" / "model")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert capped["ppl"] == free["ppl"]
    moved = capped["spill"]
    assert moved["mode"] == mode and moved["written_bytes"] > 0 and moved["read_bytes"] > moved["written_bytes"]
    assert moved["write_bytes_per_s"] > 0 and moved["read_bytes_per_s"] > 0
    assert free["spill"]["written_bytes"] == free["spill"]["read_bytes"] == 0
    if backend == "local":
        plan = plan_from_config(cfg)
        traffic = plan.spill_json()
        assert moved["written_bytes"] == traffic["run_written_bytes"]
        # The checkpoint after the last block reads every spilled batch once more, after the
        # last block's record (what report.json sums).
        assert moved["read_bytes"] == traffic["run_read_bytes"] - plan.spilled
    assert not list(spill_dir.rglob("*.bin"))  # cleaned up


@pytest.mark.timeout(180)
def test_unreachable_address_is_a_clear_error_fast(tiny_models, texts, tmp_path, monkeypatch):
    """An address nobody answers at fails at the reachability probe: ray.init (which would
    retry for minutes) is never called; the CLI prints one line and exits 2."""
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
    # In process: the probe refuses the address before Ray is asked to connect.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh driver
    monkeypatch.setattr(ray, "init", lambda *a, **kw: pytest.fail("ray.init was called"))
    refused = rf"^cluster\.address: cannot reach Ray at '127\.0\.0\.1:{port}'"
    with pytest.raises(UserError, match=refused):
        RayExecutor(_cfg(tiny_models["llama"], texts, tmp_path / "in",
                         cluster={"backend": "ray", "address": f"127.0.0.1:{port}"}), {})
    monkeypatch.undo()
    r = subprocess.run([sys.executable, "-m", "shardquant", "quantize", str(cfg), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"shardquant: error: cluster.address: cannot reach Ray at '127.0.0.1:{port}'")


# Pipeline stages only: a data-parallel Ray run resumes through the same progress.json as a
# local one (tests/test_resume.py kills that one), while stages resume by their own record.
@pytest.mark.parametrize("propagate", ["fp"])
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


def test_float_scheme_on_workers_is_bytewise_local(ray_local, tiny_models, texts, tmp_path, one_thread):
    """NVFP4 on 2 workers (each linear its own task, never row-split) exports the local run's
    bytes: a linear's NVFP4 global scale comes from its whole input group (`SolveTask.fused`)
    on whichever worker solves it. With its input quantization and SmoothQuant: each worker
    sees half the calibration windows, so the input maxima behind SmoothQuant's scales and the
    static `input_global_scale` must be reduced (by max, exactly) over the workers, and both
    workers' evaluation windows go through the same input quantization."""
    quant = {"method": "gptq", "scheme": "NVFP4", "group_size": 16, "smoothquant": 0.5}
    reports = {}
    # the Ray run exports block shards: the state files its two actors wrote, round robin
    for name, cluster, shards in (("local", {}, "2GB"), ("ray", {**TWO, "row_split": "auto"}, "block")):
        reports[name] = quantize(_cfg(tiny_models["llama"], texts, tmp_path / name, quant=quant, cluster=cluster,
                                      export={"format": "compressed-tensors", "shard_size": shards}),
                                 show_progress=False)
    assert reports["ray"]["export"]["adopted_shards"] == reports["ray"]["export"]["shards"] - 1 > 1
    a, b = read_checkpoint(tmp_path / "local" / "model"), read_checkpoint(tmp_path / "ray" / "model")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert reports["ray"]["ppl"] == reports["local"]["ppl"]
    g = [b[f"model.layers.0.self_attn.{n}.weight_global_scale"] for n in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert "model.layers.1.mlp.down_proj.input_global_scale" in b


def test_tasks_on_two_workers_equal_hflm(ray_local, tiny_models, texts, local_tasks, hflm_reference, tmp_path,
                                         one_thread):
    """eval.tasks with the sequences split over 2 workers: fp and quantized requests equal
    lm-eval's HFLM on the original model and on the fake export."""
    from task_fixtures import TASKS, assert_same_as_hflm
    from test_tasks import ours

    rep = quantize(_cfg(tiny_models["llama"], texts, tmp_path, quant={"method": "rtn", "bits": 4, "group_size": 32},
                        eval={**TASKS, "task_paths": [str(local_tasks)]}, cluster=TWO), show_progress=False)
    assert len(rep["cluster"]["workers"]) == 2
    assert_same_as_hflm(ours(rep, "fp"), hflm_reference(tiny_models["llama"]))
    assert_same_as_hflm(ours(rep, "quantized"), hflm_reference(tmp_path / "model"))
