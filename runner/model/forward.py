"""Running one decoder block on batches of hidden states, with the right attention inputs.

Position ids, rotary embeddings and the causal (or sliding-window) mask are built exactly as
transformers' own model forward builds them, once per batch shape, and reused by every block.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable

import torch
from torch import nn

from shardquant.model.adapters import Adapter


class StopForward(Exception):
    """Raised by a hook to end a block's forward early once the wanted inputs were seen."""


def _raise_stop(_module, _args, _out=None):
    raise StopForward


@functools.cache
def _cache_kwarg() -> str:
    """The mask builders' name for the KV cache: `cache` in newer transformers 5.x, before it
    `past_key_values` (the package accepts both)."""
    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


class BlockRunner:
    """Calls decoder blocks with the attention kwargs their family expects."""

    def __init__(self, adapter: Adapter, config: object, rotary: nn.Module):
        self.adapter = adapter
        self.config = config
        self.rotary = rotary
        self._cache: dict[tuple, dict] = {}

    def _kwargs(self, hidden: torch.Tensor, mask_type: str) -> dict:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        key = (hidden.shape[0], hidden.shape[1], hidden.dtype, hidden.device, mask_type)
        if key not in self._cache:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            make = create_sliding_window_causal_mask if mask_type == "sliding_attention" else create_causal_mask
            mask = make(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=None,
                position_ids=position_ids,
                **{_cache_kwarg(): None},
            )
            self._cache[key] = {
                "attention_mask": mask,
                "position_ids": position_ids,
                "position_embeddings": self.rotary(hidden, position_ids),
            }
        return self._cache[key]

    @torch.no_grad()
    def forward(self, block: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """One block on one batch [B, T, H]."""
        kwargs = self._kwargs(hidden, self.adapter.mask_type(self.config, index))
        out = block(hidden, use_cache=False, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def forward_all(
        self,
        block: nn.Module,
        index: int,
        batches: Iterable[torch.Tensor],
        *,
        stop_at: nn.Module | None = None,
        stop_after: nn.Module | None = None,
    ) -> list[torch.Tensor]:
        """Run every batch through the block; return the outputs.

        With `stop_at`, each batch's forward ends just before that submodule runs (after its
        other pre-hooks, e.g. statistics, have seen its input); with `stop_after`, just after
        that submodule ran; nothing is returned then.
        """
        if stop_at is None and stop_after is None:
            return [self.forward(block, index, hidden) for hidden in batches]
        if stop_after is not None:
            handle = stop_after.register_forward_hook(_raise_stop)
        else:
            handle = stop_at.register_forward_pre_hook(_raise_stop)
        try:
            for hidden in batches:
                try:
                    self.forward(block, index, hidden)
                except StopForward:
                    pass
        finally:
            handle.remove()
        return []


def embed_batches(embedding: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """Token windows [N, T] -> hidden-state batches [b, T, H] on the device."""
    with torch.no_grad():
        return [embedding(windows[i : i + batch_size].to(device)) for i in range(0, len(windows), batch_size)]


@torch.no_grad()
def window_nll(
    norm: nn.Module, lm_head: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (fp32) of windows, and the token count."""
    total, count = 0.0, 0
    for h, t in zip(hidden, tokens, strict=True):
        logits = torch.nn.functional.linear(norm(h.unsqueeze(0))[0], lm_head).float()
        t = t.to(logits.device)
        total += torch.nn.functional.cross_entropy(logits[:-1], t[1:], reduction="sum").item()
        count += t.numel() - 1
    return total, count


def stream_nll(
    norm: nn.Module,
    head_weight: torch.Tensor,
    batches: Iterable[torch.Tensor],
    tokens: torch.Tensor,
    batch_size: int,
) -> tuple[float, int]:
    """Summed next-token NLL and token count of a stream of hidden batches [b, T, H]; batch k
    holds the windows `tokens[k * batch_size : k * batch_size + b]`."""
    total, count = 0.0, 0
    for k, hidden in enumerate(batches):
        start = k * batch_size
        s, c = window_nll(norm, head_weight, hidden, tokens[start : start + len(hidden)])
        total += s
        count += c
    return total, count


@torch.no_grad()
def head_logits(norm: nn.Module, lm_head: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + lm_head on hidden states [B, T, H] -> fp32 logits [B, T, V]."""
    return torch.nn.functional.linear(norm(hidden), lm_head).float()
