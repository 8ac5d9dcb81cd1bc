"""Slurm for real: `shardquant slurm --submit --wait` on a one-node Slurm started by the fixture.

The job brings up a Ray head with srun on 127.0.0.1, waits for it, quantizes a tiny model and
exits with the job command's code, which `sbatch --wait` returns.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import slurm_fixture
import yaml
from conftest import run_config
from slurm_fixture import free_ports

SQ = [sys.executable, "-m", "shardquant"]
slurm_cluster = slurm_fixture.slurm_cluster  # the session fixture, used by name below


@pytest.fixture
def ray_env():
    """Run-time settings of the rendered script: loopback head, free ports, private temp dir."""
    port, dash, client, agent, agent_grpc, rt_env, metrics, nm, om = free_ports(9)
    temp = tempfile.mkdtemp(prefix="sqr-", dir="/tmp")  # short: Ray's socket paths
    yield {
        "RAY_AUTH_MODE": "disabled",  # else ~/.ray/auth_token, shared with every Ray on the machine, decides
        "SHARDQUANT_RAY_HEAD_IP": "127.0.0.1",
        "SHARDQUANT_RAY_PORT": str(port),
        "SHARDQUANT_RAY_TEMP_DIR": temp,
        "SHARDQUANT_RAY_WAIT_S": "120",
        "SHARDQUANT_RAY_HEAD_ARGS": (
            f"--dashboard-host=127.0.0.1 --dashboard-port={dash} --ray-client-server-port={client} "
            f"--dashboard-agent-listen-port={agent} --dashboard-agent-grpc-port={agent_grpc} "
            f"--runtime-env-agent-port={rt_env} --metrics-export-port={metrics} "
            f"--node-manager-port={nm} --object-manager-port={om}"
        ),
    }
    shutil.rmtree(temp, ignore_errors=True)


def leftover_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention marker (Ray's private temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(cmd[:200])
    return found


def submit(cluster, cfg: Path, log: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    args = [*SQ, "slurm", str(cfg), "--nodes", "1", "--cpus-per-node", str(cluster.cpus), "--mem", "3G",
            "--time", "00:20:00", "--partition", cluster.partition, "--log", str(log), "--submit", "--wait", *extra]
    return subprocess.run(args, env=cluster.env(**env), capture_output=True, text=True, timeout=600)


def test_render_prints_a_valid_script(tiny_models, texts, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["llama"], texts, tmp_path / "out")))
    out = tmp_path / "job.sbatch"
    proc = subprocess.run([*SQ, "slurm", str(cfg), "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-node", "32",
                           "--mem", "256G", "--time", "04:00:00", "--partition", "gpu", "--output", str(out),
                           "--", "--quant.bits=3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=32",
                 "#SBATCH --gres=gpu:8", "#SBATCH --mem=256G", "#SBATCH --time=04:00:00", "#SBATCH --partition=gpu"):
        assert line + "\n" in text
    assert f'JOB=("$PYTHON" -m shardquant quantize {cfg} --quiet --cluster.backend=ray --quant.bits=3)' in text
    assert subprocess.run(["bash", "-n", str(out)], capture_output=True).returncode == 0
    proc = subprocess.run([*SQ, "slurm", str(cfg), "--job-command", "{python} -m shardquant eval {config}",
                           "--setup", "module load cuda", "--sbatch-arg=--account=proj", "--", "--eval.n_samples=4"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f'JOB=("$PYTHON" -m shardquant eval {cfg} --eval.n_samples=4)' in proc.stdout
    assert "\nmodule load cuda\n" in proc.stdout and "#SBATCH --account=proj\n" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mem", "12X"], "--mem '12X' is not a Slurm size"),
        (["--time", "4h"], "--time '4h' is not a Slurm time"),
        (["--nodes", "0"], "--nodes must be at least 1"),
        (["--", "--quant.bitz=3"], "unknown config key 'quant.bitz'"),
    ],
)
def test_render_bad_input_exits_2(tiny_models, texts, tmp_path, args, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["llama"], texts, tmp_path / "out")))
    proc = subprocess.run([*SQ, "slurm", str(cfg), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_sbatch_job_quantizes_on_ray(slurm_cluster, tiny_models, texts, tmp_path, ray_env):
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["llama"], texts, out)))
    log = tmp_path / "job.log"
    env = ray_env
    proc = submit(slurm_cluster, cfg, log, env, "--", "--quant.bits=8", "--cluster.workers=2")
    text = log.read_text() if log.exists() else "(no log)"
    assert proc.returncode == 0, f"{proc.stderr}\n{text[-4000:]}"
    assert f"1 Ray node(s) up at 127.0.0.1:{env['SHARDQUANT_RAY_PORT']}" in text
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["quant"]["bits"] == 8
    assert report["config"]["cluster"]["backend"] == "ray"
    assert {w for b in report["blocks"] for w in b["worker"].split(",")} == {"w0", "w1"}
    assert report["ppl"]["quantized"] > 0
    index = json.loads((out / "model" / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert (out / "model" / shard).stat().st_size > 0
    assert not slurm_cluster.jobs()
    deadline = time.monotonic() + 30  # the srun steps are gone; their Ray processes with them
    while leftover_processes(env["SHARDQUANT_RAY_TEMP_DIR"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not leftover_processes(env["SHARDQUANT_RAY_TEMP_DIR"])


def test_sbatch_failing_job_returns_its_code(slurm_cluster, tiny_models, texts, tmp_path, ray_env):
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tmp_path / "no-such-model", texts, out)))
    log = tmp_path / "job.log"
    proc = submit(slurm_cluster, cfg, log, ray_env)
    assert proc.returncode == 2, f"{proc.stderr}\n{log.read_text()[-4000:]}"
    assert "shardquant: error: model.path" in log.read_text()
    assert not (out / "model").exists()


def test_ray_that_cannot_start_fails_the_job_clearly(slurm_cluster, tiny_models, texts, tmp_path, ray_env):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["llama"], texts, tmp_path / "out")))
    log = tmp_path / "job.log"
    env = {**ray_env, "SHARDQUANT_RAY_HEAD_ARGS": "--no-such-ray-option"}
    proc = submit(slurm_cluster, cfg, log, env)
    assert proc.returncode == 1, proc.stderr
    assert "shardquant-slurm: error: a `ray start` step exited early" in log.read_text()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "2"], "--nodes 2: partition 'debug' has 1 node(s)"),
        (["--cpus-per-node", "512"], "--cpus-per-node: partition 'debug' has 0 node(s) with 512 CPUs, 1 asked for (largest: localhost with"),
        (["--mem", "1T"], "--mem: partition 'debug' has 0 node(s) with 1T, 1 asked for"),
        (["--gpus-per-node", "1"], "--gpus-per-node: partition 'debug' has 0 node(s) with 1 GPUs, 1 asked for (largest: localhost with 0 GPUs)"),
        (["--partition", "gpu"], "partition 'gpu' does not exist (partitions: debug, short)"),
        (["--partition", "short", "--time", "01:00:00"], "--time 01:00:00 exceeds partition 'short' time limit (10 minutes)"),
    ],
)
def test_impossible_request_fails_fast(slurm_cluster, tiny_models, texts, tmp_path, args, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["llama"], texts, tmp_path / "out")))
    t = time.monotonic()
    proc = subprocess.run([*SQ, "slurm", str(cfg), "--submit", "--wait", *args], env=slurm_cluster.env(),
                          capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t < 30  # a bound on hanging, not a performance target
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not slurm_cluster.jobs()
