"""lm-evaluation-harness tasks, answered blockwise.

The harness asks an `LM` for loglikelihoods only after it has built every request, but the
blocks stream once. So the harness runs twice over the same tasks: first `BlockwiseLM`
records every (context, continuation) token pair the tasks ask for (prepare time, no weights
read), the pairs stream through the blocks beside the perplexity windows (`TaskSequences`),
then the harness runs again with the scores as the LM's answers and computes its metrics.
Tokenization, empty contexts and rolling windows are the harness's own (`TemplateLM`,
`get_rolling_token_windows`), as its HFLM does them, so the numbers are the harness's.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardquant.errors import UserError
from shardquant.tasks.sequences import Pair, TaskSequences

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the `eval` extra is not installed: tasks are refused at prepare
    TemplateLM = object  # type: ignore[assignment,misc]


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("eval.tasks: lm-evaluation-harness is not installed (pip install 'shardquant[eval]')") from None


class BlockwiseLM(TemplateLM):
    """A harness LM whose loglikelihoods come from blockwise scores.

    Without `answers` it records the token pairs asked for and answers (0.0, False); with
    `answers` ({pair: (logprob, is_greedy)}) it answers from them.
    """

    def __init__(self, tokenizer: Any, max_length: int, answers: dict[Pair, tuple[float, bool]] | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.answers = answers
        self.pairs: list[Pair] = []

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As HFLM encodes (no `add_bos_token`): the tokenizer's default special tokens, none
        when the string already starts with the prefix token."""
        from lm_eval.models.utils import has_bos_prefix

        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kw)

    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """The harness's own tokenization (`TemplateLM.loglikelihood`), without its progress bar
        (answering from scores takes no time)."""
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for _, ctx, cont in requests:
            key = (tuple(ctx), tuple(cont))
            if self.answers is None:
                self.pairs.append(key)
                out.append((0.0, False))
            else:
                out.append(self.answers[key])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text as the harness's disjoint rolling windows (context 1, `max_length`), summed."""
        from lm_eval import utils

        totals = []
        for (text,) in [r.args for r in requests]:
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            totals.append(sum(s for s, _ in scores))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise UserError("eval.tasks: generation tasks (output_type generate_until) are not supported; "
                        "use loglikelihood, multiple_choice or loglikelihood_rolling tasks")


@dataclass(frozen=True)
class TaskSpec:
    """What the harness runs: task names, local task folders, documents and shots per task."""

    tasks: tuple[str, ...]
    paths: tuple[str, ...] = ()
    limit: int | None = None
    num_fewshot: int | None = None


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """The harness seeds Python's, NumPy's and torch's global generators; put them back."""
    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def task_manager(spec: TaskSpec):
    """The harness's TaskManager over its own tasks plus `spec.paths`; unknown names refused."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    for p in spec.paths:
        if not Path(p).expanduser().exists():
            raise UserError(f"eval.task_paths: '{p}' does not exist")
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    paths = [str(Path(p).expanduser()) for p in spec.paths]
    tm = None
    if paths:  # indexing the harness's own few hundred task folders takes a while: only when needed
        tm = TaskManager(include_path=paths, include_defaults=False)
        if not set(spec.tasks) <= set(tm.all_tasks):
            tm = None
    tm = tm or TaskManager(include_path=paths or None)
    known = set(tm.all_tasks)
    for name in spec.tasks:
        if name not in known:
            raise UserError(f"eval.tasks: unknown task '{name}' (not a harness task nor in eval.task_paths)")
    return tm


def run_harness(lm: Any, spec: TaskSpec, *, log_samples: bool = False, tm: Any = None) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of `lm` on the spec's tasks (no bootstrap), RNGs kept."""
    from lm_eval import evaluator

    tm = tm or task_manager(spec)
    with _rng_kept():
        try:
            return evaluator.simple_evaluate(
                model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit,
                bootstrap_iters=0, log_samples=log_samples, task_manager=tm, verbosity="WARNING",
            )
        except (FileNotFoundError, ValueError) as e:  # a task's data files or YAML
            raise UserError(f"eval.tasks: {str(e).splitlines()[0]}") from None


def metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from the harness's results: numbers only, no stderr, the filter
    named only when it is not `none` (`acc`, `acc_norm`, `word_perplexity`, ...)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        row = {}
        for key, v in values.items():
            metric, _, filt = key.partition(",")
            if "stderr" in metric or metric == "sample_len" or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            row[metric if filt in ("", "none") else f"{metric}_{filt}"] = float(v)
        out[task] = row
    return out


def samples(out: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{task: [{doc_id, target, resps}]} by document: each request's raw answer (loglikelihood:
    [logprob, is_greedy]; rolling: the summed logprob), from a `log_samples` harness output."""
    return {
        task: [{"doc_id": d["doc_id"], "target": d.get("target"), "resps": [r[0] for r in d["resps"]]}
               for d in sorted(docs, key=lambda d: d["doc_id"])]
        for task, docs in out.get("samples", {}).items()
    }


@dataclass
class TaskRun:
    """A run's tasks, collected: the token pairs to stream and how to answer the harness."""

    spec: TaskSpec
    tokenizer: Any
    sequences: TaskSequences
    requests: int

    def evaluate(self, scores: Sequence[tuple[float, bool]], *, log_samples: bool = True) -> dict[str, Any]:
        """The harness's output, answered from the sequences' scores (in sequence order)."""
        answers = dict(zip(self.sequences.pairs, scores, strict=True))
        return run_harness(BlockwiseLM(self.tokenizer, self.sequences.max_length, answers), self.spec,
                           log_samples=log_samples)


def collect(spec: TaskSpec, tokenizer: Any, model_config: Any, max_length: int | None = None) -> TaskRun:
    """Run the harness once to record every token pair its tasks ask for (no model needed).
    `max_length` defaults to the harness's choice for the model (`resolve_max_length`)."""
    tm = task_manager(spec)
    from lm_eval.models.utils import resolve_max_length

    length = max_length or resolve_max_length(model_config, tokenizer)
    lm = BlockwiseLM(tokenizer, length)
    run_harness(lm, spec, tm=tm)
    return TaskRun(spec, tokenizer, TaskSequences.from_pairs(lm.pairs, length), len(lm.pairs))
