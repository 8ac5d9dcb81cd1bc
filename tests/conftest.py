"""Fixtures: tiny random models of every supported family, a byte-level BPE tokenizer, text."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

# The suite tests the installed package, never the checkout's folders by their own names
# (kernels/ would shadow the `kernels` package transformers imports): `python -m pytest`
# put the checkout first on sys.path, and Python children started here (`python -c`, `-m`,
# scripts) would put their working directory, the checkout, first on theirs.
_CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
os.environ["PYTHONSAFEPATH"] = "1"

# Triton kernels run in triton's CPU interpreter: this must be set before anything (torch,
# transformers, deepspeed) first imports triton, which reads it once.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Every Ray the tests start (in this process or in a child) listens on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

WORDS = (
    "the king queen castle night storm sword crown river forest bread wine letter horse ghost "
    "speak run hold fear love hate sleep dream wake fall rise march stand watch call answer "
    "and or but if when while because though never always often slowly quickly softly loudly "
    "my your his her our their this that these those one two three many few every no some"
).split()


def make_text(n_words: int, seed: int) -> str:
    """Deterministic pseudo-English with sentence structure (so a model has something to learn)."""
    rng = random.Random(seed)
    out, line = [], []
    for i in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.12 or i == n_words - 1:
            out.append(" ".join(line).capitalize() + rng.choice([".", "!", "?", ","]))
            line = []
    return "\n".join(" ".join(out[i : i + 4]) for i in range(0, len(out), 4)) + "\n"


def build_tokenizer(directory: Path, vocab_size: int = 320):
    """Train a byte-level BPE on fixture text and save it as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([make_text(3000, 99)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


def tiny_config(
    family: str, *, layers: int = 3, vocab: int = 320, hidden: int = 64, inter: int = 128, kv_heads: int = 2
):
    """A small transformers config of the family; sliding windows smaller than test windows."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, SmolLM3Config

    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=24)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=24, max_window_layers=1)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16, use_sliding_window=True, sliding_window=24, max_window_layers=2)
    if family == "smollm3":  # layer 1 without rotary, layer 2 with a sliding window
        return SmolLM3Config(**common, no_rope_layers=[1, 0, 1][:layers] + [1] * max(0, layers - 3),
                             use_sliding_window=True, sliding_window=24, max_window_layers=2,
                             pad_token_id=None, bos_token_id=0, eos_token_id=0)
    raise ValueError(family)


def save_tiny_model(directory: Path, family: str, *, seed: int = 0, shard: str | None = None, **kw) -> Path:
    """Build a random model of the family and save it (safetensors, fp32) with a tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size=shard or "50MB")
    build_tokenizer(directory, vocab_size=kw.get("vocab", 320))
    return directory


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads and lose a lot to a busy machine's contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, through its index, read with safetensors."""
    from safetensors import safe_open

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(str(model_dir / file), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> dict[str, Path]:
    """Disjoint calibration and evaluation text files."""
    d = tmp_path_factory.mktemp("text")
    calib = d / "calib.txt"
    calib.write_text(make_text(6000, 1))
    ev = d / "eval.txt"
    ev.write_text(make_text(3000, 2))
    return {"calib": calib, "eval": ev}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny saved model per supported family (llama is sharded over several files)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for fam in FAMILIES:
        shard = "100KB" if fam == "llama" else None
        out[fam] = save_tiny_model(root / fam, fam, shard=shard)
    return out


def reference_ppl(model_dir, windows: torch.Tensor) -> float:
    """Perplexity by transformers' own whole-model forward (independent of our pipeline)."""
    from transformers import AutoModelForCausalLM

    return model_ppl(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), windows)


def model_ppl(model, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) of a loaded transformers model over token windows [N, T]."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w.unsqueeze(0)).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            count += len(w) - 1
    return math.exp(nll / count)


def eval_windows(model_dir, texts, n=8, seq_len=64) -> torch.Tensor:
    """The evaluation text's first n sequential windows, by the model's tokenizer."""
    from transformers import AutoTokenizer

    from shardquant.data import load_text, token_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = load_text(str(texts["eval"]), key="eval.path")
    return token_windows(tok, text, n_samples=n, seq_len=seq_len, seed=0, mode="sequential", key="eval")


def run_config(model: Path, texts: dict[str, Path], output: Path, **sections) -> dict:
    """A small run-config mapping for tests; sections override keys per section."""
    cfg = {
        "model": {"path": str(model)},
        "calib": {"path": str(texts["calib"]), "n_samples": 16, "seq_len": 64, "batch_size": 4},
        "quant": {"method": "gptq", "bits": 4, "group_size": 32},
        "eval": {"path": str(texts["eval"]), "seq_len": 64, "n_samples": 8, "batch_size": 4},
        "output": str(output),
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


# Inputs tried by the hypothesis fuzz tests (tests/test_fuzz.py), by target; printed in the
# terminal summary so every run shows how much was actually fuzzed.
FUZZ_COUNTS: dict[str, int] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if FUZZ_COUNTS:
        terminalreporter.section("fuzz inputs tried")
        for name, n in sorted(FUZZ_COUNTS.items()):
            terminalreporter.write_line(f"{name}: {n}")


@pytest.fixture(scope="session")
def rtn_grid(tmp_path_factory, texts) -> dict:
    """A 4-cell RTN grid (quant.bits 2, 3, 4, 8 at group 32) on a 2-block llama, run once by
    `shardquant grid`: compressed-tensors refuses 3 bits, so that cell fails; the others finish.
    Shared by tests/test_grid.py and tests/test_compare.py."""
    import yaml

    from shardquant.cli import main

    root = tmp_path_factory.mktemp("grid")
    model = save_tiny_model(root / "llama2", "llama", layers=2)
    base = run_config(model, texts, root / "unused", calib={"n_samples": 4, "seq_len": 32},
                      quant={"method": "rtn", "bits": 4, "group_size": 32}, eval={"n_samples": 4, "seq_len": 32})
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"quant.bits": [2, 3, 4, 8]},
                                    "output": str(root / "out")}))
    rc = main(["grid", str(grid)])
    summary = json.loads((root / "out" / "grid.json").read_text())  # of the first run (tests rerun it)
    return {"grid": grid, "output": root / "out", "rc": rc, "summary": summary, "model": model}


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny saved mixture-of-experts model per MoE family (tests/moe_fixtures.py): 4
    experts (DeepSeek-V3 8), top-2; Qwen2-MoE with 3 layers, the middle one dense; DeepSeek-V3
    with 3 layers, the first dense; plus `mixtral-starved`, whose block 0 never routes a token
    to expert 3."""
    from moe_fixtures import MOE_FAMILIES, save_tiny_moe

    root = tmp_path_factory.mktemp("moe")
    out = {fam: save_tiny_moe(root / fam, fam, layers=3 if fam in ("qwen2_moe", "deepseek_v3") else 2)
           for fam in MOE_FAMILIES}
    out["mixtral-starved"] = save_tiny_moe(root / "mixtral-starved", "mixtral", seed=1, starve=3)
    return out


@pytest.fixture(scope="session")
def local_tasks(tmp_path_factory) -> Path:
    """Two tiny lm-eval task YAMLs over local jsonl files (tests/task_fixtures.py)."""
    from task_fixtures import write_tasks

    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="session")
def hflm_reference(local_tasks):
    """lm-eval's own HFLM on the local tasks, per model directory, computed once each."""
    from task_fixtures import hflm_results

    cache: dict[str, tuple[dict, dict]] = {}

    def get(model_dir: Path) -> tuple[dict, dict]:
        key = str(model_dir)
        if key not in cache:
            cache[key] = hflm_results(model_dir, local_tasks)
        return cache[key]

    return get
