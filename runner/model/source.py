"""A model directory opened lazily: meta-device skeleton, tensors read one block at a time.

`ModelSource` validates the directory (config, weights index, tokenizer) without reading any
weights, then hands out materialized pieces (embedding, block i, final norm + lm_head) that
the caller frees after use, so the whole model never sits in memory.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from shardquant.config import compute_dtype
from shardquant.errors import UserError, stop_requested
from shardquant.model.adapters import Adapter, InputGroup, get_adapter
from shardquant.model.checkpoint import CheckpointIndex
from shardquant.model.experts import checkpoint_layout, num_experts
from shardquant.model.packed import packed_reader

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
SIDE_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch understands it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"model.device: '{name}' is not a device (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device: '{name}' asked for but no CUDA device is available")
    return dev


class ModelSource:
    """A local HF checkpoint, checked up front and read lazily."""

    def __init__(
        self,
        path: str | Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        trust_remote_code: bool = False,
        key: str = "model.path",
        packed: bool = False,
    ):
        """`packed`: read a quantized checkpoint's packed linears (`model.packed`: eval); else
        a config.json `quantization_config` is refused (nothing to calibrate)."""
        from transformers import AutoConfig

        self.root = Path(path).expanduser()
        self.key = key
        if not self.root.is_dir():
            raise UserError(f"{key}: model directory '{self.root}' does not exist")
        if not (self.root / "config.json").is_file():
            raise UserError(f"{key}: '{self.root}' has no config.json (not an HF model directory)")
        try:
            raw = json.loads((self.root / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{key}: '{self.root / 'config.json'}' is not valid JSON") from None
        if not isinstance(raw, dict):
            raise UserError(f"{key}: '{self.root / 'config.json'}' is not a JSON object")
        if raw.get("quantization_config") and not packed:
            qc = raw["quantization_config"]
            method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
            raise UserError(
                f"{key}: '{self.root / 'config.json'}' declares a quantization_config ({method}): the checkpoint is "
                "already quantized; give its float (bfloat16, float16 or float32) version"
            )
        get_adapter(raw.get("model_type"), key=key)  # refuses an unsupported family first
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.config = AutoConfig.from_pretrained(self.root, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{key}: cannot read config.json: {str(e).splitlines()[0]}") from None
        # Resolved by the values transformers builds the model from (config.json's, or the
        # config class's defaults for keys it leaves out).
        self.adapter: Adapter = get_adapter(raw.get("model_type"), key=key, config=self.config.to_dict())
        if not any((self.root / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(f"{key}: '{self.root}' has no tokenizer (tokenizer.json or tokenizer.model)")
        self.index = CheckpointIndex(self.root, key=key)
        self.packed = packed_reader(raw, str(self.root / "config.json"))  # a quantized checkpoint's linears, dequantized as read
        self.device = resolve_device(device)
        self.dtype = DTYPES[compute_dtype(dtype, self.device.type)]
        self.trust_remote_code = trust_remote_code
        self.skeleton = self._build_skeleton()
        # Tensors transformers keeps in float32 whatever the dtype (DeepSeek-V3's router weight
        # and score-correction bias: `_keep_in_fp32_modules_strict`), as name substrings.
        plan = getattr(self.skeleton, "_get_dtype_plan", None)
        self.fp32_patterns = tuple(p for p, d in (plan(self.dtype) if plan else {}).items() if d == torch.float32)
        self._check_weights_present()

    # --- structure -------------------------------------------------------------------------

    def _build_skeleton(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(
                    self.config,
                    dtype=self.dtype,
                    attn_implementation="sdpa",
                    trust_remote_code=self.trust_remote_code,
                )
        return checkpoint_layout(model, self.adapter).eval()

    @property
    def num_blocks(self) -> int:
        return len(self.skeleton.get_submodule(self.adapter.blocks))

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def _packed_parts(self, name: str) -> list[str] | None:
        """The stored tensors of parameter `name` when it is a packed linear's weight."""
        if self.packed is None or not name.endswith(".weight"):
            return None
        linear = name.removesuffix(".weight")
        try:
            module = self.skeleton.get_submodule(linear)
        except AttributeError:
            module = None
        return self.packed.parts(linear, self.index.__contains__, module)

    def _check_weights_present(self) -> None:
        for name, _ in self.skeleton.named_parameters():
            if self._packed_parts(name) or name in self.index:  # the packed check first: it checks the parts
                continue
            if name == f"{self.adapter.lm_head}.weight" and self.tied_embeddings:
                continue
            raise UserError(f"{self.key}: weight '{name}' is missing from the safetensors files")

    def block_groups(self, index: int) -> tuple[InputGroup, ...]:
        """The input groups of block `index` (a sparse block's include its experts')."""
        block = self.skeleton.get_submodule(f"{self.adapter.blocks}.{index}")
        return self.adapter.block_groups(num_experts(block, self.adapter))

    def block_linears(self, index: int) -> tuple[str, ...]:
        """Block-relative names of the quantizable linears of block `index`, in order."""
        return tuple(n for g in self.block_groups(index) for n in g.linears)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each quantizable linear of any block, by
        block-relative name (blocks of one model agree on the linears they share)."""
        out: dict[str, tuple[int, int]] = {}
        kinds: set[tuple[str, ...]] = set()
        for i in range(self.num_blocks):
            names = self.block_linears(i)
            if names in kinds:
                continue
            kinds.add(names)
            block = self.skeleton.get_submodule(f"{self.adapter.blocks}.{i}")
            out.update({n: tuple(block.get_submodule(n).weight.shape) for n in names if n not in out})
        return out

    def tensor_dtype(self, name: str) -> torch.dtype:
        """The dtype a floating tensor `name` is loaded (and exported) in: the compute dtype,
        or float32 for what transformers keeps in float32 (`fp32_patterns`)."""
        return torch.float32 if any(p in name for p in self.fp32_patterns) else self.dtype

    # --- materialization ------------------------------------------------------------------

    def read_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read named tensors from their safetensors files (grouped by file)."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for n in names:
            by_file[self.index.files[n]].append(n)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for n in group:
                        out[n] = f.get_tensor(n)
            except (OSError, RuntimeError, ValueError, SafetensorError) as e:
                if stop_requested():  # a signal landed inside the reader
                    raise KeyboardInterrupt from None
                raise UserError(f"{self.key}: cannot read '{path.name}': {str(e).splitlines()[0]}") from None
        return out

    def load(self, module_name: str, *, packed_kernels: bool = False) -> nn.Module:
        """Materialize the skeleton's submodule `module_name` on the device, weights from disk.

        `packed_kernels`: a packed linear the W4A16 kernel runs for (`PackedReader.kernel_linear`)
        becomes a `PackedLinear` holding its packed tensors, in a copy of the skeleton's module
        (the skeleton keeps its `nn.Linear`); every other packed linear is dequantized."""
        module = self.skeleton.get_submodule(module_name)
        prefix = f"{module_name}."
        wanted = [n for n, _ in module.named_parameters()] + [
            n for n, _ in module.named_buffers() if n in dict(module.state_dict())
        ]
        names = {n: prefix + n for n in wanted}
        packed = {full: parts for full in names.values() if (parts := self._packed_parts(full))}
        stored = [full for full in names.values() if full in self.index and full not in packed]
        tensors = self.read_tensors(stored + [n for parts in packed.values() for n in parts])
        kept: dict[str, nn.Module] = {}  # block-relative linear name -> PackedLinear
        for full, parts in packed.items():
            linear, own = full.removesuffix(".weight"), {n: tensors.pop(n) for n in parts}
            local = linear.removeprefix(prefix)
            if packed_kernels and isinstance(module.get_submodule(local), nn.Linear):
                if (pl := self.packed.kernel_linear(linear, own, self.device)) is not None:
                    kept[local] = pl
                    continue
            tensors[full] = self.packed.weight(linear, own)
        if kept:
            module = copy.deepcopy(module)
            for local, pl in kept.items():
                if f"{local}.bias" in names:
                    bias = tensors.pop(names.pop(f"{local}.bias"))
                    pl.bias = bias.to(device=self.device, dtype=self.tensor_dtype(f"{prefix}{local}.bias"))
                names.pop(f"{local}.weight")
                module.set_submodule(local, pl)
        state = {f"{local}.{k}": v for local, pl in kept.items() for k, v in pl.state_dict().items()}
        for local, full in names.items():
            t = tensors.get(full)
            if t is None and full == f"{self.adapter.lm_head}.weight" and self.tied_embeddings:
                t = self.read_tensors([f"{self.adapter.embed}.weight"])[f"{self.adapter.embed}.weight"]
            if t is None:
                raise UserError(f"{self.key}: weight '{full}' is missing from the safetensors files")
            state[local] = t.to(device=self.device, dtype=self.tensor_dtype(full) if t.is_floating_point() else t.dtype)
        module.load_state_dict(state, strict=True, assign=True)
        module.requires_grad_(False)
        return module

    def input_quantization(self, index: int) -> dict[str, tuple[object, dict[str, torch.Tensor]]]:
        """Block `index`'s packed linears whose inputs the checkpoint quantizes (`model.packed_ct`):
        block-relative name -> (the library's `QuantizationArgs`, the stored static parameters by
        suffix); {} for a checkpoint that quantizes no inputs."""
        if self.packed is None or self.packed.described_inputs() is None:
            return {}
        prefix = f"{self.adapter.blocks}.{index}."
        block = self.skeleton.get_submodule(prefix[:-1])
        parts = {n.removesuffix(".weight"): p for n, _ in block.named_parameters()
                 if n.endswith(".weight") and (p := self._packed_parts(prefix + n))}
        tensors = self.read_tensors([n for p in parts.values() for n in p if ".input_" in n])
        out = {}
        for local, names in parts.items():
            got = self.packed.inputs(prefix + local, {n: tensors[n] for n in names if n in tensors})
            if got is not None:
                out[local] = got
        return out

    def block(self, index: int, *, packed_kernels: bool = False) -> nn.Module:
        """Block `index`, materialized (`load`)."""
        return self.load(f"{self.adapter.blocks}.{index}", packed_kernels=packed_kernels)

    @staticmethod
    def release(module: nn.Module) -> None:
        """Free a materialized module's tensors (back to the meta device)."""
        module.to_empty(device="meta")

    def rotary(self) -> nn.Module:
        """A fresh rotary-embedding module on the device (its buffers are computed, not loaded)."""
        cls = type(self.skeleton.get_submodule(self.adapter.rotary))
        with torch.device(self.device):
            rot = cls(config=self.skeleton.config)
        return rot.eval()

    def tokenizer(self):
        """The checkpoint's tokenizer; UserError when it cannot be loaded."""
        from transformers import AutoTokenizer

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return AutoTokenizer.from_pretrained(self.root, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UserError(f"{self.key}: cannot load the tokenizer: {str(e).splitlines()[0]}") from None

    def non_block_names(self) -> list[str]:
        """Tensor names outside the blocks (embedding, final norm, lm_head), as stored."""
        prefix = f"{self.adapter.blocks}."
        return [n for n in self.index.names() if not n.startswith(prefix)]
