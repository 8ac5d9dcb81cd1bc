"""A local multiple-choice task from held-out public-domain text: given two lines of a play,
choose its true next line among three distractor lines from the same play. Usage:

    python benchmarks/next_line.py OUT_DIR [--play twelfth_night_gut.txt] [--docs 100] [--seed 0]

Writes OUT_DIR/next_line.jsonl ({context, choices, answer}) and OUT_DIR/next_line.yaml (an
lm-eval task over it: `eval.tasks: [next_line]`, `eval.task_paths: [OUT_DIR]`). The play is
from the Shakespeare asset (`shardquant.tools.assets`) and is in neither the calibration
plays nor the perplexity play.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

YAML = """\
task: next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: "\\n"
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


def verse_lines(text: str) -> list[list[str]]:
    """The play's speeches as lists of spoken lines (speaker names, stage directions and
    headings dropped)."""
    speeches, cur = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            if cur:
                speeches.append(cur)
            cur = []
        elif re.fullmatch(r"[A-Z][A-Z .'\-]+\.", line) or line.startswith(("[", "SCENE", "ACT")):
            continue
        else:
            cur.append(line)
    return [s for s in speeches if len(s) >= 3]


def build(out: Path, play: str, docs: int, seed: int) -> Path:
    from shardquant.tools.assets import CALIB_PLAYS, EVAL_PLAY, shakespeare_split

    if play in CALIB_PLAYS or play == EVAL_PLAY:
        raise SystemExit(f"{play} is a calibration or perplexity play: pick a held-out one")
    calib, _ = shakespeare_split()
    speeches = verse_lines((calib.parent / play).read_text(encoding="utf-8", errors="replace"))
    rng = random.Random(seed)
    pool = [ln for s in speeches for ln in s if len(ln.split()) >= 4]
    rows = []
    for s in rng.sample(speeches, min(docs, len(speeches))):
        k = rng.randrange(2, len(s))
        true = s[k]
        if len(true.split()) < 4:
            continue
        choices = [true, *rng.sample([p for p in pool if p != true], 3)]
        rng.shuffle(choices)
        rows.append({"context": "\n".join(s[k - 2 : k]), "choices": choices, "answer": choices.index(true)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "next_line.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "next_line.yaml").write_text(YAML.format(data=(out / "next_line.jsonl").resolve()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--play", default="twelfth_night_gut.txt")
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = build(Path(a.out), a.play, a.docs, a.seed)
    print(f"written: {out / 'next_line.yaml'} ({sum(1 for _ in open(out / 'next_line.jsonl'))} documents)")


if __name__ == "__main__":
    main()
