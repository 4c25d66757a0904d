"""Attach a bank and a per-row state to any HF causal LM, and take them off again."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
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

    @torch.no_grad()
    def merge_row(self, row: int = 0) -> None:
        """Fold row ``row``'s whole LoRA (blend, generated factors, memory) into the base weights in place, so that a
        forward of that row alone costs what the base model's does. The original weights are kept and copied back —
        exactly — at the state's next write, or at a forward of a batch, another row or training
        (:meth:`unmerge`). Outputs equal the unmerged ones up to float rounding. A row whose memory is scaled
        (``set_memory_weight``) is not merged."""
        self.unmerge()
        if self.state.rows_scaled:
            return
        saved = {}
        for name, (lora_a, lora_b) in self.state.effective_factors(row).items():
            weight = self.layers[name].base_layer.weight
            delta = lora_b.float() @ lora_a.float()  # (out, in)
            saved[name] = weight.detach().clone()
            weight += (delta if delta.shape == weight.shape else delta.T).to(weight.dtype)  # Conv1D is (in, out)
        self._merged_weights = saved
        self.state.merged_row, self.state.on_change = row, self.unmerge

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the weights :meth:`merge_row` changed, exactly (a no-op when none is merged)."""
        for name, weight in getattr(self, "_merged_weights", {}).items():
            self.layers[name].base_layer.weight.copy_(weight)
        self._merged_weights = {}
        self.state.merged_row, self.state.on_change = None, None

    def detach(self) -> nn.Module:
        """Put the original layers back and return the plain base model."""
        self.unmerge()
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
