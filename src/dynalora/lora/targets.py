"""Which layers of a base model take a dynamic LoRA, and their shapes.

Linear layers (``nn.Linear`` and GPT-2's ``Conv1D``) inside the transformer blocks are candidates.
By default the attention projections are targeted; any suffix list can be asked for instead.
"""

from __future__ import annotations

from torch import nn

ModuleShapes = dict[str, tuple[int, int]]  # module name -> (in_features, out_features)

ATTENTION_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "attn.c_attn", "attn.c_proj",
                      "query_key_value", "qkv_proj", "self_attn.dense", "out_proj")
MLP_SUFFIXES = ("gate_proj", "up_proj", "down_proj", "mlp.c_fc", "mlp.c_proj", "fc1", "fc2",
                "dense_h_to_4h", "dense_4h_to_h")
KNOWN_SUFFIXES = ATTENTION_SUFFIXES + MLP_SUFFIXES
_NEVER_TARGETED = ("lm_head", "embed_out", "score")


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a ``Conv1D`` (whose weight is (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape
    return in_features, out_features


def module_shapes_of(model: nn.Module) -> ModuleShapes:
    """Every linear layer of the model except the output head, in model order (a layer wrapped by
    dynalora is listed under its own name, not as ``<name>.base_layer``)."""
    return {name.removesuffix(".base_layer"): linear_shape(module) for name, module in model.named_modules()
            if is_linear(module) and name.split(".")[-1] not in _NEVER_TARGETED}


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def find_target_modules(model: nn.Module, suffixes: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Names of the linear layers to wrap. ``suffixes=None`` = the attention projections; ``"all"`` in
    the list = every known projection (attention and MLP). Raises ``ValueError`` naming what exists."""
    shapes = module_shapes_of(model)
    if suffixes is None:
        wanted = ATTENTION_SUFFIXES
    elif "all" in suffixes:
        wanted = KNOWN_SUFFIXES
    else:
        wanted = tuple(suffixes)
    found = [name for name in shapes if any(_matches(name, s) for s in wanted)]
    if suffixes is not None and "all" not in suffixes:
        for suffix in wanted:
            if not any(_matches(name, suffix) for name in shapes):
                leaves = sorted({name.split(".")[-1] for name in shapes})
                raise ValueError(f"target module {suffix!r} matches no linear layer of the model; "
                                 f"its linear layers end in {leaves}")
    if not found:
        leaves = sorted({name.split(".")[-1] for name in shapes})
        raise ValueError(f"found no known projection layers to target; pass target_modules= one or more "
                         f"of {leaves}")
    return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a HF causal LM (Llama/Qwen/Mistral ``model.layers``, GPT-2 ``transformer.h``)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "layers"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; pass EngineConfig.feature_layer "
                     "and a model with model.layers or transformer.h")
