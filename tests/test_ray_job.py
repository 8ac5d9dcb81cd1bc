"""`ray job submit` for real: a Ray head on 127.0.0.1 (own ports, own temp dir) runs quantize jobs.

Two ways to get shardquant onto the cluster, both with the Ray backend: installed on the nodes
(here: the venv the head runs in), or shipped with the job as a wheel in `py_modules`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import run_config
from slurm_fixture import free_ports

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _session_pids(sid: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getsid(int(proc.name)) == sid:
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1; yields the dashboard URL; stopped by its pid after."""
    port, dash, client, agent, agent_grpc, rt_env, metrics, nm, om = free_ports(9)
    temp = tempfile.mkdtemp(prefix="sqr-", dir="/tmp")  # short: Ray's socket paths
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # jobs run `shardquant`/`python` from the venv
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1 (Ray swaps it for the LAN address)
        "RAY_AUTH_MODE": "disabled",  # not ~/.ray/auth_token, which every Ray on the machine shares
        "RAY_ADDRESS": "",
    }
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
         f"--metrics-export-port={metrics}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Ray head did not come up: {(Path(temp) / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "env": {**env, "RAY_API_SERVER_ADDRESS": url}}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` drains, then stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        for pid in _session_pids(head.pid):  # anything of this head left over
            os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def job_dir(tmp_path: Path, model: Path, texts, out: Path) -> Path:
    d = tmp_path / "job"
    d.mkdir()
    (d / "run.yaml").write_text(yaml.safe_dump(run_config(model, texts, out)))
    return d


def submit(ray_head, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head["url"], "--log-style=record", *args]
    return subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=600)


def check_run(out: Path, bits: int) -> None:
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["cluster"]["backend"] == "ray"
    assert report["config"]["quant"]["bits"] == bits
    assert report["ppl"]["quantized"] > 0
    index = json.loads((out / "model" / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert (out / "model" / shard).stat().st_size > 0


def test_submit_with_package_installed(ray_head, tiny_models, texts, tmp_path):
    out = tmp_path / "out"
    d = job_dir(tmp_path, tiny_models["llama"], texts, out)
    proc = submit(ray_head, "--working-dir", str(d), "--",
                  "shardquant", "quantize", "run.yaml", "--quiet", "--cluster.backend=ray", "--quant.bits=8")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout
    check_run(out, 8)


def test_submit_with_package_shipped(ray_head, tiny_models, texts, tmp_path):
    ship = tmp_path / "ship"  # the README recipe: the package alone (no dependencies) as a py_module
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(ship), str(REPO)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    assert sorted(p.name for p in ship.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "shardquant"]
    out = tmp_path / "out"
    d = job_dir(tmp_path, tiny_models["llama"], texts, out)
    entry = ("python -c 'import shardquant; print(\"shardquant from\", shardquant.__file__)' && "
             "python -m shardquant quantize run.yaml --quiet --cluster.backend=ray --quant.bits=4")
    runtime_env = {"py_modules": [str(ship / "shardquant")]}
    proc = submit(ray_head, "--working-dir", str(d), "--runtime-env-json", json.dumps(runtime_env),
                  "--", "sh", "-c", entry)  # one word: ray quotes each entrypoint word
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    source = next(line for line in proc.stdout.splitlines() if line.startswith("shardquant from "))
    assert str(REPO) not in source and "runtime_resources" in source, source  # shipped, not the checkout
    check_run(out, 4)


def test_failing_job_fails_the_submit(ray_head, tiny_models, texts, tmp_path):
    d = job_dir(tmp_path, tmp_path / "no-such-model", texts, tmp_path / "out")
    proc = submit(ray_head, "--working-dir", str(d), "--", "shardquant", "quantize", "run.yaml", "--quiet",
                  "--cluster.backend=ray")
    assert proc.returncode != 0
    assert "shardquant: error: model.path" in proc.stdout
    assert "failed" in proc.stdout
