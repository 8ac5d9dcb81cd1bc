"""The Ray executor: N `BlockWorker` actors, data parallel over the calibration samples.

Each actor holds a contiguous share of the calibration and evaluation windows and loads the
current block itself (from the model directory, which every node must see). Per observation
phase every actor accumulates its statistics; the Hessians go, as object refs, straight to the
actors that solve (each linear on one actor, or a large GPTQ linear's row slices on several:
`solve_units`; bin-packed by cost), which sum them exactly (sum, count); the quantized weights go, as refs, to every actor, so all hold the same
quantized block and propagate their own samples. The driver only moves small things (AWQ
channel means and losses, per-layer losses) and never loads a weight. Block files and the
final shards are written by the actors, spread over them, in parallel.

A lost actor (killed process, out of memory, dead node) is replaced in the same placement
bundle; the pipeline then reloads every actor's activations from the last saved block and
redoes the block.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch

from shardquant.calib.steps import SolveTask
from shardquant.config import RunConfig, config_dict
from shardquant.errors import UserError
from shardquant.execution.packing import assign, pack_units, unit_cost
from shardquant.execution.worker import BlockWorker

ZERO_COPY = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}


def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
             "OutOfMemoryError", "NodeDiedError", "ObjectLostError", "OwnerDiedError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def _loopback_only() -> None:
    """Make a private local Ray listen on 127.0.0.1 only. Ray otherwise swaps 127.0.0.1 for the
    machine's LAN address and its GCS and raylet listen on every interface; the switch is read
    from the environment when Ray is imported, and from its constants module at start."""
    import sys

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with one line, when a host:port Ray address does not answer (ray.init would
    retry for minutes)."""
    import socket

    target = address.split("://", 1)[-1]
    if target in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as e:
        raise UserError(
            f"cluster.address: cannot reach Ray at '{address}' ({e.strerror or e}); start the cluster "
            "(ray start --head) or fix the address"
        ) from None


def _placement_error(workers: int, bundle: dict[str, float], total: dict[str, float]) -> UserError:
    """The error for `workers` bundles that the Ray cluster (its resources `total`) cannot hold."""
    return UserError(
        f"cluster.workers: cannot place {workers} workers of {bundle} on the Ray cluster "
        f"(it has CPU={total.get('CPU', 0):g}, GPU={total.get('GPU', 0):g}); lower "
        "cluster.workers, cluster.cpus_per_worker or cluster.gpus_per_worker"
    )


def solve_units(
    tasks: list[SolveTask], shapes: dict[str, tuple[int, int]], world: int, row_split: str = "auto"
) -> tuple[list[SolveTask], list[float]]:
    """The units a solve of `tasks` is packed as onto `world` workers, and each unit's cost.

    One worker: the tasks as they are. Otherwise one unit per linear (`shapes`: its (out, in)),
    a large GPTQ linear in row slices (`execution.packing.pack_units`)."""
    if world == 1:
        costs = [unit_cost(sum(shapes[n][0] for n in t.linears), shapes[t.linears[0]][1]) for t in tasks]
        return list(tasks), costs
    whole = [replace(t, linears=(n,)) for t in tasks for n in t.linears]
    units = pack_units([(u.kind, *shapes[u.linears[0]]) for u in whole], world, row_split)
    return [replace(whole[u.index], rows=u.rows) for u in units], [u.cost for u in units]


class RayBlockWorker(BlockWorker):
    """A `BlockWorker` in a Ray actor: statistics handed in as object refs are fetched one at
    a time, when the solve reaches them; they are read-only, so the running sum is a new one."""

    owns_parts = False

    def resolve(self, part: Any) -> Any:
        import ray

        return ray.get(part) if isinstance(part, ray.ObjectRef) else part


class RayExecutor:
    """The executor protocol (`shardquant.execution.protocol.Executor`) on Ray actors, data parallel."""

    worker_cls: type = RayBlockWorker
    staged = False

    def __init__(self, cfg: RunConfig, linear_shapes: dict[str, tuple[int, int]]):
        """`linear_shapes`: (out, in) of each block linear (ModelSource.linear_shapes), to
        balance the solves."""
        if not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
            _loopback_only()
        import ray
        from ray.util.placement_group import placement_group

        self.cfg = cfg
        c = cfg.cluster
        os.environ.update(ZERO_COPY)
        self._own_ray = False
        if not ray.is_initialized():
            address = c.address or os.environ.get("RAY_ADDRESS") or None
            kwargs: dict[str, Any] = {
                "runtime_env": {"env_vars": dict(ZERO_COPY)},
                "log_to_driver": False,
                "configure_logging": False,
            }
            if address is not None:
                _check_reachable(address)
            if address is None:
                # A private local Ray, listening on loopback only.
                kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1")
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"cluster.address: cannot connect to Ray at '{address}': {str(e).splitlines()[0]}") from None
            self._own_ray = True
        bundle: dict[str, float] = {"CPU": c.cpus_per_worker}
        if c.gpus_per_worker:
            bundle["GPU"] = c.gpus_per_worker
        total = ray.cluster_resources()
        for res, need in bundle.items():
            if need * c.workers > total.get(res, 0):
                self._shutdown()
                raise _placement_error(c.workers, bundle, total)
        self._pg = placement_group([dict(bundle) for _ in range(c.workers)], strategy=c.placement.upper())
        ready, _ = ray.wait([self._pg.ready()], timeout=60)
        if not ready:
            ray.util.remove_placement_group(self._pg)
            self._shutdown()
            raise _placement_error(c.workers, bundle, total)
        self._cfg_dict = config_dict(cfg)
        self.actors = [self._spawn(k) for k in range(c.workers)]
        self.names = [f"w{k}" for k in range(c.workers)]
        self.failures = 0
        self._stats: list = []
        self._pending: list = []
        self._index = -1
        self._block_writers: dict[str, int] = {}  # block file -> the actor writing it
        self._setup_args: tuple | None = None
        self._shapes = dict(linear_shapes)

    @property
    def world(self) -> int:
        return len(self.actors)

    def _spawn(self, k: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        c = self.cfg.cluster
        actor_cls = ray.remote(self.worker_cls)
        return actor_cls.options(
            num_cpus=c.cpus_per_worker,
            num_gpus=c.gpus_per_worker,
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=k),
        ).remote(self._cfg_dict, k, c.workers, name=f"w{k}")

    def _all(self, method: str, *args, **kwargs) -> list:
        import ray

        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    # --- run lifecycle --------------------------------------------------------------------

    def setup(self, calib: torch.Tensor | None, evals: torch.Tensor | None, *, do_fp_eval: bool,
              tasks: Any = None) -> None:
        """Each actor embeds its share of the windows (and of the eval.tasks sequences)."""
        import ray

        self._setup_args = (ray.put(calib), ray.put(evals), do_fp_eval, ray.put(tasks))
        self._windows = ray.get([
            a.setup.remote(self._setup_args[0], self._setup_args[1], do_fp_eval=do_fp_eval, tasks=self._setup_args[3])
            for a in self.actors
        ])

    def begin_block(self, index: int) -> None:
        self._index = index
        self._all("begin_block", index)

    def end_block(self, block_file: str) -> list[dict[str, Any]]:
        import ray

        writer = self._index % self.world
        self._block_writers[block_file] = writer
        return ray.get([a.end_block.remote(block_file if k == writer else None)
                        for k, a in enumerate(self.actors)])

    def block_file_digest(self, block_file: str) -> str:
        """Wait for the worker that writes `block_file` to finish it; its sha256."""
        import ray

        return ray.get(self.actors[self._block_writers.pop(block_file)].block_file_digest.remote(block_file))

    def begin_save_activations(self, paths: list[str]) -> None:
        """Each worker starts writing its share to its path (in the background)."""
        import ray

        ray.get([a.begin_save_activations.remote(p) for a, p in zip(self.actors, paths, strict=True)])

    def end_save_activations(self) -> list[str | None]:
        """Wait for the writes; their sha256s, in worker order."""
        import ray

        return ray.get([a.end_save_activations.remote() for a in self.actors])

    def load_activations(self, paths: list[str]) -> None:
        import ray

        ray.get([a.load_activations.remote(p) for a, p in zip(self.actors, paths, strict=True)])

    def assemble(self, jobs: list) -> dict[str, str]:
        """Shards written in parallel: job k on actor k mod N; their sha256 by path."""
        import ray

        parts: list[list] = [[] for _ in self.actors]
        for k, job in enumerate(jobs):
            parts[k % self.world].append(job)
        digests: dict[str, str] = {}
        for d in ray.get([a.assemble.remote(p) for a, p in zip(self.actors, parts, strict=True) if p]):
            digests.update(d)
        return digests

    def nll(self) -> list[dict[str, tuple[float, int]]]:
        return self._all("nll")

    def task_scores(self) -> list[dict[str, list[tuple[float, bool]]]]:
        """Each actor's task-sequence scores, in worker (= sequence share) order."""
        return self._all("task_scores")

    def peak_rss(self) -> list[int]:
        """Each worker's peak RSS (report.json: cluster.peak_rss_bytes)."""
        return self._all("peak_rss")

    def recover(self, error: BaseException) -> bool:
        """Replace dead actors when `error` is a lost worker and failures remain; True if so."""
        import ray

        if not isinstance(error, _lost_worker_errors()) or self.failures >= self.cfg.cluster.max_failures:
            return False
        self.failures += 1
        for k, a in enumerate(self.actors):
            try:
                ray.get(a.info.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - any failure to answer means the actor is gone
                ray.kill(a, no_restart=True)
                self.actors[k] = self._spawn(k)
                if self._setup_args is not None:
                    calib, evals, do_fp, tasks = self._setup_args
                    ray.get(self.actors[k].setup.remote(calib, evals, do_fp_eval=do_fp, tasks=tasks))
        self._stats, self._pending = [], []
        self._block_writers = {}  # the block in flight is redone, and its writer may be gone
        return True

    def close(self) -> None:
        import ray

        actors = getattr(self, "actors", [])
        try:  # let each worker remove its spill files before it is killed
            ray.get([a.close.remote() for a in actors], timeout=60)
        except Exception:  # noqa: BLE001 - best effort on the way out: a lost worker has none left
            pass
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        try:
            ray.util.remove_placement_group(self._pg)
        except Exception:  # noqa: BLE001
            pass
        self._shutdown()

    def _shutdown(self) -> None:
        import ray

        if self._own_ray:
            ray.shutdown()
            self._own_ray = False

    # --- block steps (see calibrate.BlockSteps) --------------------------------------------

    def observe(self, groups, *, channel, capture):
        import ray

        self._stats = []  # the last pass's parts leave the object store before this pass's arrive
        refs = [
            a.observe_parts.options(num_returns=2).remote(groups, channel=channel, capture=capture)
            for a in self.actors
        ]
        self._stats = [r[0] for r in refs]
        means = {}
        for part in ray.get([r[1] for r in refs]):
            for g, (total, count) in part.items():
                acc = means.setdefault(g, [0, 0])
                acc[0] = acc[0] + total
                acc[1] += count
        return {g: total / count for g, (total, count) in means.items() if count}  # see LocalExecutor.observe

    def _window_offsets(self) -> tuple[list[int], int]:
        """Each worker's first calibration window in the global order, and the window count."""
        return [sum(self._windows[:k]) for k in range(self.world)], sum(self._windows)

    def awq_losses(self, group, linears, quantized, consumer, x_mean):
        import ray

        offsets, total = self._window_offsets()
        parts = ray.get([
            a.awq_losses.remote(group, linears, quantized, consumer, x_mean, off, total)
            for a, off in zip(self.actors, offsets, strict=True)
        ])
        totals = [sum(p[0][i] for p in parts) for i in range(len(parts[0][0]))]
        count = sum(p[1] for p in parts)
        return [t / count for t in totals]

    def fold(self, group, choice, prev, linears):
        self._all("fold", group, choice, prev, linears)

    def sample_rows(self, group, n):
        """The rows a single process would sample: each worker sends those in its range."""
        import ray

        tokens = self.cfg.calib.seq_len
        offsets, total = self._window_offsets()
        parts = ray.get([a.sample_rows.remote(group, n, off * tokens, total * tokens)
                         for a, off in zip(self.actors, offsets, strict=True)])
        return torch.cat([p.cpu() for p in parts])

    def solve(self, tasks: list[SolveTask]) -> dict[str, float]:
        """Each linear, or each row slice of a large GPTQ linear (`solve_units`), on one actor
        (bin-packed by solve cost), from every actor's stats; a split linear's loss is the sum
        of its slices'."""
        import ray

        # Float formats are never row-split: NVFP4's global scale and fp8 blocks span rows
        # (the config refuses row_split: always with them).
        row_split = "never" if self.cfg.quant.kind != "int" else self.cfg.cluster.row_split
        units, costs = solve_units(tasks, self._shapes, self.world, row_split)
        owner = assign(costs, self.world)
        weights, losses = [], []
        for k, a in enumerate(self.actors):
            mine = [u for u, o in zip(units, owner, strict=True) if o == k]
            if not mine:
                continue
            # Refs inside a list are not resolved by Ray: the solver fetches them one at a time.
            w_ref, l_ref = a.solve.options(num_returns=2).remote(mine, self._stats)
            weights.append(w_ref)
            losses.append(l_ref)
        self._pending = weights
        out: dict[str, float] = {}
        for part in ray.get(losses):
            for name, loss in part.items():
                out[name] = out.get(name, 0.0) + loss
        return out

    def apply(self) -> None:
        self._all("apply", *self._pending)
        self._pending = []

    def end_group(self, group: str) -> None:
        self._all("end_group", group)

    def input_extremes(self) -> dict[str, torch.Tensor]:
        """Every worker's `ChannelMax.signed` of the last observation, reduced by max (exact)."""
        out: dict[str, torch.Tensor] = {}
        for part in self._all("input_extremes"):
            for g, m in part.items():
                m = m.cpu()
                out[g] = m if g not in out else torch.maximum(out[g], m)
        return out

    def calibrate_inputs(self, plan) -> None:
        self._all("calibrate_inputs", plan)

    def expert_tokens(self) -> dict[str, Any]:
        """Every worker's routing counts of the last pass, summed."""
        parts = [p for p in self._all("expert_tokens") if p]
        if not parts:
            return {}
        return {"routed": [sum(col) for col in zip(*(p["routed"] for p in parts), strict=True)],
                "rows": sum(p["rows"] for p in parts)}


__all__ = ["RayBlockWorker", "RayExecutor", "assign", "solve_units"]
