"""Dynamic LoRA core: a bank of adapters, a per-row state, the injected layer, PEFT import/export."""

from dynalora.lora.bank import AdapterInfo, LoraBank
from dynalora.lora.export import ExportReport, export_row
from dynalora.lora.inject import DynamicLoraModel, InjectConfig
from dynalora.lora.layer import DynamicLoraLinear
from dynalora.lora.peft_io import AdapterError, read_peft_adapter, write_peft_adapter
from dynalora.lora.state import LoraState, StateConfig, StateError
from dynalora.lora.targets import find_target_modules, module_shapes_of

__all__ = [
    "AdapterError", "AdapterInfo", "DynamicLoraLinear", "DynamicLoraModel", "ExportReport", "InjectConfig",
    "LoraBank", "LoraState", "StateConfig", "StateError", "export_row", "find_target_modules",
    "module_shapes_of", "read_peft_adapter", "write_peft_adapter",
]
