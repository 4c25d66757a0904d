"""Attach a bank and a per-row state to any HF causal LM, and take them off again."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from dynalora.lora.bank import LoraBank
from dynalora.lora.layer import DynamicLoraLinear
from dynalora.lora.state import LoraState, StateConfig
from dynalora.lora.targets import find_target_modules, module_shapes_of


@dataclass
class InjectConfig:
    """Which layers take a dynamic LoRA and how large the per-row state is."""

    target_modules: list[str] | None = None
    """Layer-name suffixes to wrap (e.g. ``["q_proj", "v_proj"]``, or ``["all"]``). ``None``: the
    attention projections plus every module the bank's adapters touch."""
    state: StateConfig = field(default_factory=StateConfig)
    """Rows and factor ranks of the per-row state."""


class DynamicLoraModel(nn.Module):
    """A base model whose target layers read a shared per-row :class:`LoraState`.

    Example::

        dyn = DynamicLoraModel.attach(model, bank)
        dyn.state.set_blend_by_label(0, {"news": 1.0})
        logits = dyn(input_ids).logits
        dyn.export_peft(0, "out/news-row0")
    """

    def __init__(self, model: nn.Module, bank: LoraBank, state: LoraState, layers: dict[str, DynamicLoraLinear]):
        super().__init__()
        self.model = model
        self.bank = bank
        self.state = state
        self.__dict__["layers"] = layers  # already submodules of `model`; don't register twice

    @classmethod
    def attach(cls, model: nn.Module, bank: LoraBank | None = None, config: InjectConfig | None = None,
               ) -> "DynamicLoraModel":
        config = config or InjectConfig()
        if any(isinstance(m, DynamicLoraLinear) for m in model.modules()):
            raise ValueError("this model already has dynalora layers; detach() them first")
        bank = bank if bank is not None else LoraBank(module_shapes_of(model))
        targets = find_target_modules(model, config.target_modules)
        if config.target_modules is None:
            targets = [m for m in module_shapes_of(model) if m in set(targets) | set(bank.modules)]
        parameter = next(model.parameters())
        state = LoraState(bank, targets, config.state, dtype=parameter.dtype, device=parameter.device)
        layers = {}
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = DynamicLoraLinear(getattr(parent, child), state, name)
            setattr(parent, child, layer)
            layers[name] = layer
        return cls(model, bank, state, layers)

    def detach(self) -> nn.Module:
        """Put the original layers back and return the plain base model."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base_layer)
        self.layers.clear()
        return self.model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def target_modules(self) -> list[str]:
        return list(self.layers)

    def export_peft(self, row: int, folder: str | Path, rank: int | None = None):
        """Write one row's effective LoRA as a PEFT folder (see :func:`dynalora.lora.export.export_row`)."""
        from dynalora.lora.export import export_row

        return export_row(self, row, folder, rank=rank)
