"""Mixture-of-experts blocks in the checkpoint's own layout: one nn.Linear per expert.

transformers 5 holds a sparse block's experts fused (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]) and converts the checkpoint's per-expert linears on load. Here the skeleton is
given the checkpoint's layout instead (`checkpoint_layout`): each fused experts module is
replaced by `PerExpert`, whose children are the checkpoint's linears, and the submodules
transformers renames (Mixtral's `block_sparse_moe` -> `mlp`) get their checkpoint names
back. So a block's tensors load, quantize and export by their on-disk names like any other
linear, and the router and the sparse block's own forward stay transformers'. `PerExpert`
computes what transformers' eager experts loop computes (tests/test_moe.py proves the whole
model against transformers' own forward).

For statistics, `PerExpert` counts the tokens the router sends to each expert (`counting`),
and with `observe_all` also runs every expert on the tokens not routed to it, output
discarded, so each expert's statistics see every token while the block's output keeps the
real routing. With `active` set (a pass that observes only some experts: `quant.moe_experts_per_pass`),
only those experts run; the block's output is then partial, and the pass ends right after the
sparse block (its output is never used).
"""

from __future__ import annotations

import torch
from torch import nn

from shardquant.model.adapters import Adapter, Experts


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its linears under the checkpoint's names."""

    def __init__(self, spec: Experts, hidden: int, intermediate: int, act: nn.Module):
        super().__init__()
        self.names = (spec.gate, spec.up, spec.down)
        self.add_module(spec.gate, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(spec.up, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(spec.down, nn.Linear(intermediate, hidden, bias=False))
        object.__setattr__(self, "act", act)  # shared, not a child: it has no tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class PerExpert(nn.ModuleList):
    """The routed experts of one block as `ExpertMLP`s; called like transformers' fused
    experts module: (hidden [N, H], top_k_index [N, k], top_k_weights [N, k]) -> [N, H]."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.observe_all = False
        self.counting = False
        self.active: frozenset[int] | None = None  # the experts that run; None: all
        self.routed = torch.zeros(len(experts), dtype=torch.int64)  # tokens routed to each, while counting
        self.rows = 0  # tokens seen while counting

    def reset_counts(self) -> None:
        self.routed = torch.zeros(len(self), dtype=torch.int64)
        self.rows = 0

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        n = len(self)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=n).permute(2, 1, 0)  # [E, k, N]
            if self.counting:
                self.routed += mask.sum(dim=(1, 2)).cpu()
                self.rows += hidden.shape[0]
        for e in range(n):
            if self.active is not None and e not in self.active:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            if self.observe_all:  # statistics only: the tokens not routed here, output dropped
                others = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
                others[token_idx] = False
                if bool(others.any()):
                    self[e](hidden[others])
            if token_idx.numel() == 0:
                continue
            y = self[e](hidden[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _fused_experts(module: nn.Module, spec: Experts) -> bool:
    return isinstance(getattr(module, spec.fused_gate_up, None), torch.Tensor) and isinstance(
        getattr(module, spec.fused_down, None), torch.Tensor
    )


def _rename(block: nn.Module, old: str, new: str) -> None:
    """Register `block.old` as `block.new` (its tensors then carry the new name); `old` stays
    an attribute, so the block's own forward still finds it."""
    module = block._modules.pop(old)
    block.add_module(new, module)
    object.__setattr__(block, old, module)


def checkpoint_layout(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Give a (meta-device) model the checkpoint's module names: the adapter's renames, and
    per-expert linears for every fused experts module. Returns the model."""
    blocks = model.get_submodule(adapter.blocks)
    for block in blocks:
        for old, new in adapter.renames:
            if old in block._modules and new not in block._modules:
                _rename(block, old, new)
        spec = adapter.experts
        if spec is None:
            continue
        try:
            fused = block.get_submodule(spec.module)
        except AttributeError:
            continue  # a dense layer of a MoE model
        if not _fused_experts(fused, spec):
            continue
        gate_up, down = getattr(fused, spec.fused_gate_up), getattr(fused, spec.fused_down)
        n, inter2, hidden = gate_up.shape
        act = fused.act_fn
        with torch.device(gate_up.device):
            experts = PerExpert([ExpertMLP(spec, hidden, inter2 // 2, act) for _ in range(n)])
        experts.to(gate_up.dtype)
        parent_name, _, leaf = spec.module.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, leaf, experts)
        if tuple(down.shape) != (n, hidden, inter2 // 2):
            raise ValueError(f"{spec.module}: {spec.fused_down} has shape {tuple(down.shape)}")
    return model


def block_experts(block: nn.Module, adapter: Adapter) -> PerExpert | None:
    """The block's routed experts, or None for a dense block."""
    if adapter.experts is None:
        return None
    try:
        module = block.get_submodule(adapter.experts.module)
    except AttributeError:
        return None
    return module if isinstance(module, PerExpert) else None


def num_experts(block: nn.Module, adapter: Adapter) -> int:
    """Routed experts of a block (0 for a dense block)."""
    experts = block_experts(block, adapter)
    return 0 if experts is None else len(experts)


def fused_weights(block: nn.Module, spec: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's expert weights as transformers fuses them: (gate_up [E, 2I, H], down [E, H, I])."""
    experts = block.get_submodule(spec.module)
    gate_up = torch.stack([torch.cat([getattr(x, spec.gate).weight, getattr(x, spec.up).weight]) for x in experts])
    down = torch.stack([getattr(x, spec.down).weight for x in experts])
    return gate_up, down
