"""dynalora: let a Hugging Face causal LM rewrite its own LoRA while it runs."""

from dynalora.lora import (AdapterError, DynamicLoraModel, InjectConfig, LoraBank, LoraState, StateConfig,
                           StateError)
from dynalora.models import load_base_model, tiny_model

__version__ = "0.1.0"
__all__ = ["AdapterError", "DynamicLoraModel", "InjectConfig", "LoraBank", "LoraState", "StateConfig",
           "StateError", "load_base_model", "tiny_model"]
