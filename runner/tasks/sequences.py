"""Task requests as token sequences that stream through the blocks like perplexity windows.

An lm-evaluation-harness loglikelihood request is a context and a continuation in tokens;
a rolling request is cut into such pairs by the harness's own windowing. Each pair becomes one
sequence: `(context + continuation)[-(max_length + 1):][:-1]`, scored on its last
`len(continuation)` positions, exactly as the harness's HFLM feeds a causal model. Sequences
are sorted by length (longest first) and padded on the right into batches; right padding
changes nothing before it under a causal mask.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shardquant.model.forward import head_logits

Pair = tuple[tuple[int, ...], tuple[int, ...]]  # (context tokens, continuation tokens)


@dataclass(frozen=True)
class TaskSequences:
    """Unique (context, continuation) token pairs in batch order, with their model inputs."""

    pairs: tuple[Pair, ...]
    max_length: int

    @classmethod
    def from_pairs(cls, pairs: Iterable[Pair], max_length: int) -> TaskSequences:
        """Deduplicated, longest first (ties by tokens), so every batch pads little."""
        unique = {(tuple(c), tuple(k)) for c, k in pairs}
        return cls(tuple(sorted(unique, key=lambda p: (-len(p[0]) - len(p[1]), p))), max_length)

    def __len__(self) -> int:
        return len(self.pairs)

    def inputs(self, k: int) -> tuple[list[int], list[int]]:
        """Pair k's model input and its scored continuation."""
        ctx, cont = self.pairs[k]
        return list(ctx + cont)[-(self.max_length + 1):][:-1], list(cont)

    def share(self, start: int, stop: int) -> TaskSequences:
        return TaskSequences(self.pairs[start:stop], self.max_length)

    def token_batches(self, batch_size: int, pad_id: int = 0) -> list[Tensor]:
        """Right-padded input batches [b, T] of up to batch_size sequences, in order."""
        out = []
        for s in range(0, len(self), batch_size):
            rows = [self.inputs(k)[0] for k in range(s, min(s + batch_size, len(self)))]
            width = max(len(r) for r in rows)
            out.append(torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long))
        return out


def embed_sequences(emb: nn.Module, seqs: TaskSequences, batch_size: int, device: torch.device | str) -> list[Tensor]:
    """The sequences' input embeddings, batch by batch."""
    with torch.no_grad():
        return [emb(b.to(device)) for b in seqs.token_batches(batch_size)]


@torch.no_grad()
def score_sequences(
    norm: nn.Module, head_weight: Tensor, batches: Iterable[Tensor], seqs: TaskSequences, batch_size: int
) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether it is the greedy choice) per
    sequence, from the last hidden states of its batches (fp32 log-softmax)."""
    out: list[tuple[float, bool]] = []
    for b, hidden in enumerate(batches):
        logp = torch.log_softmax(head_logits(norm, head_weight, hidden), dim=-1)
        for j in range(hidden.shape[0]):
            inp, cont = seqs.inputs(b * batch_size + j)
            n = len(cont)
            rows = logp[j, len(inp) - n : len(inp)]
            target = torch.tensor(cont, device=rows.device)
            greedy = bool((rows.argmax(dim=-1) == target).all())
            out.append((float(rows.gather(1, target[:, None]).sum()), greedy))
    return out
