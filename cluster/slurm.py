"""Slurm launch: render the Ray sbatch script for a run, check a request against `sinfo`, submit.

`render_sbatch` fills `templates/ray.sbatch`: the script starts a Ray head on the first node and
a worker on every other node (srun), waits until all joined (`wait_for_nodes`, run as
`python -m shardquant.cluster.slurm wait ...` inside the job), runs the job command with
`RAY_ADDRESS` exported and exits with its code. `check_partition` compares a request with what
`sinfo` reports, so an impossible request fails at once with one line instead of pending forever
(Slurm queues a job that exceeds a partition unless `EnforcePartLimits` is set).
"""

from __future__ import annotations

import argparse
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from shardquant.errors import UserError

SINFO_TIMEOUT_S = 20
DEFAULT_PORT = 6379


@dataclass(frozen=True)
class SlurmRequest:
    """What one job asks of Slurm: a Ray node per Slurm node, one task each."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 1
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    job_name: str = "shardquant"
    log: str = "shardquant-%j.out"
    sbatch_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_node"):
            if getattr(self, name) < 1:
                raise UserError(f"slurm: --{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise UserError(f"slurm: --gpus-per-node must be 0 or more, got {self.gpus_per_node}")
        if self.mem is not None:
            mem_mb(self.mem)
        if self.time is not None:
            minutes(self.time)


_MEM = re.compile(r"^(\d+)([KMGT]?)B?$", re.IGNORECASE)
_MEM_FACTOR = {"K": 1 / 1024, "M": 1, "": 1, "G": 1024, "T": 1024**2}


def mem_mb(text: str) -> float:
    """Slurm memory ('256G', '16000', '16000M', '1T'; no unit = MB) in MB."""
    m = _MEM.match(text.strip())
    if not m:
        raise UserError(f"slurm: --mem '{text}' is not a Slurm size like 256G or 16000M")
    return int(m.group(1)) * _MEM_FACTOR[m.group(2).upper()]


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def minutes(text: str) -> float | None:
    """Slurm time ('MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM', 'D-HH:MM:SS') in minutes;
    None for 'infinite'/'UNLIMITED'."""
    t = text.strip()
    if t.lower() in ("infinite", "unlimited"):
        return None
    m = _TIME.match(t)
    if not m:
        raise UserError(f"slurm: --time '{text}' is not a Slurm time like 04:00:00 or 1-00:00:00")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return int(days) * 1440 + h * 60 + mi + s / 60
    if c is not None:  # HH:MM:SS
        return int(a) * 60 + int(b) + int(c) / 60
    if b is not None:  # MM:SS
        return int(a) + int(b) / 60
    return float(a)


def _template() -> str:
    return resources.files("shardquant.cluster").joinpath("templates/ray.sbatch").read_text(encoding="utf-8")


PYTHON_VAR = "$PYTHON"  # a job-command word that stays the script's $PYTHON (SHARDQUANT_PYTHON)


def default_command(config: Path, overrides: list[str]) -> list[str]:
    """The job command of a rendered script: quantize CONFIG on the Ray backend."""
    return [PYTHON_VAR, "-m", "shardquant", "quantize", str(config), "--quiet", "--cluster.backend=ray", *overrides]


def _word(w: str) -> str:
    return f'"{PYTHON_VAR}"' if w == PYTHON_VAR else shlex.quote(w)


def render_sbatch(
    config: str | Path,
    req: SlurmRequest,
    overrides: list[str] | None = None,
    command: list[str] | None = None,
    setup: list[str] | None = None,
    python: str = sys.executable,
    port: int = DEFAULT_PORT,
) -> str:
    """The sbatch script text for one run; `command` replaces the default quantize command."""
    config = Path(config).resolve()
    cmd = command if command is not None else default_command(config, list(overrides or []))
    if not cmd:
        raise UserError("slurm: --job-command is empty")
    lines = [
        f"#SBATCH --job-name={req.job_name}",
        f"#SBATCH --nodes={req.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={req.cpus_per_node}",
        f"#SBATCH --output={req.log}",
    ]
    if req.gpus_per_node:
        lines.append(f"#SBATCH --gres=gpu:{req.gpus_per_node}")
    if req.mem:
        lines.append(f"#SBATCH --mem={req.mem}")
    if req.time:
        lines.append(f"#SBATCH --time={req.time}")
    if req.partition:
        lines.append(f"#SBATCH --partition={req.partition}")
    lines += [f"#SBATCH {a}" for a in req.sbatch_args]
    values = {
        "SBATCH": "\n".join(lines),
        "PYTHON": shlex.quote(python),
        "CPUS": str(req.cpus_per_node),
        "GPUS": str(req.gpus_per_node),
        "PORT": str(port),
        "SETUP": "\n".join(setup or []),
        "COMMAND": " ".join(_word(c) for c in cmd),
    }
    text = _template()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{[A-Z]+\}\}", text)
    assert not left, f"unfilled template fields {left}"
    return text


@dataclass(frozen=True)
class SlurmNode:
    """One node of a partition as `sinfo -N` reports it."""

    name: str
    cpus: int
    mem_mb: float
    gpus: int


def _sinfo(args: list[str]) -> str:
    try:
        proc = subprocess.run(["sinfo", "--noheader", *args], capture_output=True, text=True,
                              timeout=SINFO_TIMEOUT_S)
    except FileNotFoundError:
        raise UserError("slurm: `sinfo` not found: run on a Slurm login node, or render the script "
                        "without --submit") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"slurm: `sinfo` did not answer within {SINFO_TIMEOUT_S} s (is slurmctld up?)") from None
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"slurm: `sinfo` failed: {msg}")
    return proc.stdout


def _gpus(gres: str) -> int:
    total = 0
    for item in gres.split(","):
        m = re.match(r"^gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def partition_nodes(partition: str | None) -> tuple[str, list[SlurmNode], float | None]:
    """(partition name, its nodes, its time limit in minutes or None) from `sinfo`."""
    rows = [r.split("|") for r in _sinfo(["--format=%P|%a|%l"]).split()]
    names = {r[0].rstrip("*"): r for r in rows}
    if partition is None:
        defaults = [r[0].rstrip("*") for r in rows if r[0].endswith("*")]
        if not defaults:
            raise UserError(f"slurm: no default partition; pass --partition (partitions: {', '.join(names)})")
        partition = defaults[0]
    if partition not in names:
        raise UserError(f"slurm: partition '{partition}' does not exist (partitions: {', '.join(names) or 'none'})")
    limit = names[partition][2]
    nodes: dict[str, SlurmNode] = {}
    for line in _sinfo(["-N", f"--partition={partition}", "--format=%N|%c|%m|%G"]).split():
        name, cpus, mem, gres = line.split("|")
        nodes[name] = SlurmNode(name, int(cpus.rstrip("+")), float(mem.rstrip("+")), _gpus(gres))
    return partition, list(nodes.values()), minutes(limit) if limit not in ("n/a", "") else None


def check_partition(req: SlurmRequest) -> str:
    """Refuse a request the partition can never satisfy (one UserError line); return its name."""
    part, nodes, limit = partition_nodes(req.partition)
    if req.nodes > len(nodes):
        raise UserError(f"slurm: --nodes {req.nodes}: partition '{part}' has {len(nodes)} node(s)")
    checks = [
        ("--cpus-per-node", req.cpus_per_node, "cpus", f"{req.cpus_per_node} CPUs", lambda n: f"{n.cpus} CPUs"),
        ("--gpus-per-node", req.gpus_per_node, "gpus", f"{req.gpus_per_node} GPUs", lambda n: f"{n.gpus} GPUs"),
    ]
    if req.mem:
        checks.append(("--mem", mem_mb(req.mem), "mem_mb", req.mem, lambda n: f"{n.mem_mb:.0f}M memory"))
    fit = list(nodes)
    for flag, want, attr, shown, have in checks:
        ok = [n for n in fit if getattr(n, attr) >= want]
        if len(ok) < req.nodes:
            best = max(nodes, key=lambda n, a=attr: getattr(n, a))
            raise UserError(
                f"slurm: {flag}: partition '{part}' has {len(ok)} node(s) with {shown}, {req.nodes} asked for "
                f"(largest: {best.name} with {have(best)})"
            )
        fit = ok
    if req.time and limit is not None and (minutes(req.time) or float("inf")) > limit:
        raise UserError(f"slurm: --time {req.time} exceeds partition '{part}' time limit ({limit:.0f} minutes)")
    return part


def submit(script: str, wait: bool) -> int:
    """`sbatch [--wait]` the script from stdin; the job's exit code with wait, else 0."""
    cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else [])
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise UserError("slurm: `sbatch` not found: run on a Slurm login node") from None
    out, err = proc.communicate(script)
    job = out.strip().split(";")[0]
    if not job:  # refused at submission
        msg = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise UserError(f"slurm: sbatch refused the job: {msg.removeprefix('sbatch: error: ')}")
    print(f"submitted batch job {job}", file=sys.stderr)
    return proc.returncode if wait else 0


def run_cli(args: argparse.Namespace, extra: list[str]) -> int:
    """`shardquant slurm CONFIG ...`: render (print or --output), optionally check and --submit."""
    from shardquant.config import load_config

    overrides = extra[1:] if extra[:1] == ["--"] else list(extra)
    load_config(args.config, overrides)  # a bad config or override fails here, not in the queue
    req = SlurmRequest(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
        mem=args.mem, time=args.time, partition=args.partition, job_name=args.job_name,
        log=args.log, sbatch_args=tuple(args.sbatch_arg or ()),
    )
    command = None
    if args.job_command is not None:
        cfg_path = str(Path(args.config).resolve())
        words = shlex.split(args.job_command)
        command = [PYTHON_VAR if w == "{python}" else w.replace("{config}", cfg_path) for w in words] + overrides
    script = render_sbatch(args.config, req, overrides, command=command, setup=args.setup, port=args.port)
    if args.output:
        Path(args.output).write_text(script, encoding="utf-8")
        print(f"written: {args.output}", file=sys.stderr)
    elif not args.submit:
        sys.stdout.write(script)
    if not args.submit:
        return 0
    check_partition(req)
    return submit(script, wait=args.wait)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `slurm` subcommand's arguments (an entry point of `shardquant.commands`, see shardquant.cli)."""
    text = "render (and optionally submit) an sbatch script that runs a quantize job on Ray across Slurm nodes"
    s = sub.add_parser(
        "slurm", help=text, allow_abbrev=False,
        description=text + ". Overrides after `--` (or anywhere) go to the job's config, e.g. "
        "`shardquant slurm run.yaml --nodes 2 --gpus-per-node 8 -- --quant.bits=3`.",
    )
    s.add_argument("config", help="YAML run config (its absolute path goes into the script)")
    s.add_argument("--nodes", type=int, default=1, help="Slurm nodes = Ray nodes (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    s.add_argument("--cpus-per-node", type=int, default=1, help="CPUs per node (default 1)")
    s.add_argument("--mem", help="memory per node, e.g. 256G (default: the partition's)")
    s.add_argument("--time", help="time limit, e.g. 04:00:00 (default: the partition's)")
    s.add_argument("--partition", help="partition (default: the cluster's default)")
    s.add_argument("--job-name", default="shardquant", help="job name (default shardquant)")
    s.add_argument("--log", default="shardquant-%j.out", help="job log, sbatch --output (default shardquant-%%j.out)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Ray head port (default {DEFAULT_PORT})")
    s.add_argument("--setup", action="append", metavar="CMD",
                   help="shell line run before Ray starts, e.g. 'module load cuda' (repeatable)")
    s.add_argument("--sbatch-arg", action="append", metavar="ARG",
                   help="extra #SBATCH line, e.g. --sbatch-arg=--account=proj (repeatable)")
    s.add_argument("--job-command", metavar="CMD",
                   help="replace the job command (default: python -m shardquant quantize CONFIG "
                   "--cluster.backend=ray); {config} stands for the config's absolute path, {python} for the script's interpreter")
    s.add_argument("--output", help="write the script here instead of stdout")
    s.add_argument("--submit", action="store_true",
                   help="check the request against sinfo, then sbatch the script")
    s.add_argument("--wait", action="store_true", help="with --submit: wait and return the job's exit code")


# ---- inside the job: wait until every Ray node has joined ----


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for_nodes(address: str, n: int, timeout: float, pids: list[int] | None = None) -> int:
    """Block until `n` Ray nodes are alive at `address`; raise RuntimeError naming what failed."""
    deadline = time.monotonic() + timeout
    host, port = address.rsplit(":", 1)

    def check() -> None:
        dead = [p for p in pids or [] if not _alive(p)]
        if dead:
            raise RuntimeError(f"a `ray start` step exited early (srun pid {dead[0]}); see the job log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray nodes did not all join {address} within {timeout:.0f} s")

    while True:  # the GCS port first: ray.init would wait on its own, without our deadline
        check()
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            break
        except OSError:
            time.sleep(1)
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        while True:
            alive = sum(1 for node in ray.nodes() if node["Alive"])
            if alive >= n:
                return alive
            try:
                check()
            except RuntimeError as e:
                raise RuntimeError(f"{e}: {alive} of {n} joined") from None
            time.sleep(2)
    finally:
        ray.shutdown()


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardquant.cluster.slurm")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait", help="wait until N Ray nodes joined ADDRESS")
    w.add_argument("--address", required=True)
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--timeout", type=float, default=300)
    w.add_argument("--pids", type=int, nargs="*", default=[])
    args = p.parse_args(argv)
    try:
        n = wait_for_nodes(args.address, args.nodes, args.timeout, args.pids)
    except RuntimeError as e:
        print(f"shardquant-slurm: error: {e}", file=sys.stderr)
        return 1
    print(f"shardquant-slurm: {n} Ray node(s) up at {args.address}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
