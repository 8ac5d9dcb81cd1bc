"""Two tiny local lm-eval tasks over local files (no hub): a multiple-choice task (which
sentence comes next) and a rolling-loglikelihood task (documents' perplexity)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from conftest import make_text

MC_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

ROLLING_YAML = """\
task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def write_tasks(directory: Path, *, n_docs: int = 12, seed: int = 7) -> Path:
    """The two task YAMLs and their jsonl data in `directory` (an lm-eval include path)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    text = make_text(3000, seed).replace("\n", " ")
    lines = [s for s in re.split(r"(?<=[.!?])\s+", text) if 3 < len(s.split()) < 10]
    mc = []
    for k in range(n_docs):
        ctx, true = lines[2 * k], lines[2 * k + 1]
        choices = [true, *rng.sample(lines[40:], 3)]
        rng.shuffle(choices)
        mc.append({"context": ctx, "choices": choices, "answer": choices.index(true)})
    docs = [{"text": make_text(40 + 25 * k, 100 + k)} for k in range(3)]
    (directory / "tiny_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (directory / "tiny_rolling.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "tiny_mc.yaml").write_text(MC_YAML.format(data=directory / "tiny_mc.jsonl"))
    (directory / "tiny_rolling.yaml").write_text(ROLLING_YAML.format(data=directory / "tiny_rolling.jsonl"))
    return directory


MAX_LENGTH = 96  # eval.task_max_length and HFLM's max_length: rolling windows of 96 tokens
TASKS = {"tasks": ["tiny_mc", "tiny_rolling"], "task_max_length": MAX_LENGTH, "batch_size": 4}


def hflm_results(model_dir: Path, tasks_dir: Path) -> tuple[dict, dict]:
    """lm-eval's own HFLM (transformers' whole model) on the two tasks: (metrics, samples)."""
    from lm_eval.models.huggingface import HFLM

    from shardquant.tasks.harness import TaskSpec, metrics, run_harness, samples

    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4, max_length=MAX_LENGTH)
    out = run_harness(lm, TaskSpec(tuple(TASKS["tasks"]), (str(tasks_dir),)), log_samples=True)
    return metrics(out), samples(out)


def assert_same_as_hflm(ours: tuple[dict, dict], ref: tuple[dict, dict]) -> None:
    """Every request's loglikelihood to float tolerance, the same greedy flags, accuracies
    equal and the rolling task's perplexities equal to float tolerance."""
    import pytest

    (m, s), (rm, rs) = ours, ref
    assert set(s) == set(rs) == {"tiny_mc", "tiny_rolling"}
    for task in rs:
        assert [d["doc_id"] for d in s[task]] == [d["doc_id"] for d in rs[task]]
        for d, r in zip(s[task], rs[task], strict=True):
            for a, b in zip(d["resps"], r["resps"], strict=True):
                if isinstance(b, list | tuple):  # (logprob, is_greedy)
                    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-4)
                    assert a[1] == b[1]
                else:  # a rolling document's summed logprob
                    assert a == pytest.approx(b, rel=1e-5, abs=1e-3)
    assert m["tiny_mc"]["acc"] == rm["tiny_mc"]["acc"] and m["tiny_mc"]["acc_norm"] == rm["tiny_mc"]["acc_norm"]
    assert 0 < rm["tiny_mc"]["acc"] < 1 or rm["tiny_mc"]["acc_norm"] not in (0.0, 1.0)  # not trivially equal
    for k, v in rm["tiny_rolling"].items():
        assert m["tiny_rolling"][k] == pytest.approx(v, rel=1e-5)
