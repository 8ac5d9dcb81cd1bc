"""Reusing a block's finished stages between the passes of true-sequential calibration.

Observing input group k needs the block's forward up to that group's input, with the groups
before it already quantized. Restarting from the block's input for every group costs about
3.5 block forwards per block. But once every linear of a stage (an adapter's `Stage`: the
attention or the MLP) is final, that stage's output for each calibration batch no longer
changes, so later passes take it from here; and a stage whose last linear (its `tail`) was
the group just observed is finished from that linear's captured input, one matmul instead of
the whole stage. Quantizing a block then costs about one forward pass of it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from shardquant.calib.steps import block_work
from shardquant.config import QuantConfig
from shardquant.model.adapters import Adapter, Stage
from shardquant.model.experts import num_experts


def _first(out: object) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _passthrough(x: Tensor, *_a, **_kw) -> Tensor:
    return x


class StageCache:
    """Per-batch outputs of a block's finished stages, valid for one block's calibration stream.

    `final` are the linears whose weights will not change again in this block (those not
    quantized at all, then each group as it is applied: see `mark_final`).
    """

    def __init__(self, block: nn.Module, stages: Iterable[Stage], linears: Iterable[str], final: Iterable[str]):
        self.block = block
        self.stages = tuple(stages)
        linears = tuple(linears)
        self.members = {s.module: tuple(n for n in linears if n.startswith(s.module + ".")) for s in self.stages}
        self.final = set(final)
        self.tail_inputs: dict[str, list[Tensor]] = {}
        self.outputs: dict[str, list[Tensor]] = {}
        self.batch = 0

    def mark_final(self, names: Iterable[str]) -> None:
        """These linears hold their quantized weights for good."""
        self.final.update(names)

    def _finished(self, stage: Stage, also: Iterable[str] = ()) -> bool:
        done = self.final | set(also)
        return all(n in done for n in self.members[stage.module])

    def offer_tail(self, name: str, group: Iterable[str], inputs: list[Tensor]) -> None:
        """The inputs of linear `name` (one per calibration batch) seen while observing the
        group `group`: kept when `name` is a stage's tail and every other linear of that stage
        is final or belongs to the group being quantized from these very inputs."""
        for st in self.stages:
            if st.tail == name and self._finished(st, also=group):
                self.tail_inputs[name] = inputs

    def invalidate(self, prev: str, group: Iterable[str]) -> None:
        """AWQ folded scales into `group` and `prev`: drop what was kept of every stage either
        lies in. (Dividing the kept inputs by the scales instead would skip the rounding that
        the rescaled, already quantized `prev` really applies.)"""
        group = tuple(group)
        for st in self.stages:
            inside = (st.module + ".",)
            if prev.startswith(inside) or any(n.startswith(inside) for n in group):
                self.outputs.pop(st.module, None)
                self.tail_inputs.pop(st.tail, None)

    @classmethod
    def for_block(cls, block: nn.Module, adapter: Adapter, index: int, q: QuantConfig) -> StageCache:
        """A cache for the calibration of block `index`: its linears that `q` does not
        quantize are final from the start."""
        block_name = adapter.block_prefix(index).rstrip(".")
        groups = adapter.block_groups(num_experts(block, adapter))
        quantized = {n for _, names in block_work(groups, block_name, q) for n in names}
        linears = tuple(n for g in groups for n in g.linears)
        return cls(block, adapter.stages, linears, [n for n in linears if n not in quantized])

    def in_order(self, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """`fn` telling the cache, call by call, which batch (0, 1, ...) it runs."""
        order = itertools.count()

        def step(h: Tensor) -> Tensor:
            self.batch = next(order)
            return fn(h)

        return step

    def batches(self, items: Iterable[Tensor]) -> Iterator[Tensor]:
        """`items` in order, telling the cache which batch is being run."""
        for i, x in enumerate(items):
            self.batch = i
            yield x

    @contextmanager
    def active(self, n_batches: int, *, record: bool = True) -> Iterator[None]:
        """Within: stages with kept outputs answer from them, finished stages with a kept tail
        input run only their tail, and (with `record`) finished stages that run are recorded.
        A pass must run all `n_batches` batches in order, setting `batch` (see `batches`),
        for its records to be kept."""
        patched: list[nn.Module] = []
        hooks = []
        recording: dict[str, list[Tensor]] = {}
        for st in self.stages:
            mod = self.block.get_submodule(st.module)
            wrap = (lambda y: (y, None)) if st.returns_tuple else (lambda y: y)
            if st.module in self.outputs:
                outs = self.outputs[st.module]

                def cached(*_a, outs=outs, wrap=wrap, **_kw):
                    return wrap(outs[self.batch])

                mod.forward = cached
                patched.append(mod)
            elif st.tail in self.tail_inputs and self._finished(st):
                tail, xs = self.block.get_submodule(st.tail), self.tail_inputs[st.tail]
                rec = recording[st.module] = [] if record else None

                def from_tail(*_a, tail=tail, xs=xs, rec=rec, wrap=wrap, **_kw):
                    with torch.no_grad():
                        y = tail(xs[self.batch])
                    if rec is not None:
                        rec.append(y)
                    return wrap(y)

                mod.forward = from_tail
                patched.append(mod)
            elif record and self._finished(st):
                rec = recording[st.module] = []
                hooks.append(mod.register_forward_hook(lambda _m, _a, out, rec=rec: rec.append(_first(out).detach())))
        for st in self.stages:  # a reused stage ignores its input: skip the op that makes it
            if st.input_op and self.block.get_submodule(st.module) in patched:
                op = self.block.get_submodule(st.input_op)
                op.forward = _passthrough
                patched.append(op)
        try:
            yield
        finally:
            for mod in patched:
                del mod.forward
            for h in hooks:
                h.remove()
        for st in self.stages:
            rec = recording.get(st.module)
            if rec is not None and len(rec) == n_batches:
                self.outputs[st.module] = rec
                self.tail_inputs.pop(st.tail, None)

    def clear(self) -> None:
        self.tail_inputs, self.outputs = {}, {}

    def nbytes(self) -> int:
        kept = [*self.tail_inputs.values(), *self.outputs.values()]
        return sum(x.numel() * x.element_size() for xs in kept for x in xs)
