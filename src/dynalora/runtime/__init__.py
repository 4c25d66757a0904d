"""Generation that changes its own LoRA: the engine, trigger policies, special tokens, events."""

from dynalora.runtime.engine import KV_POLICIES, Engine, EngineConfig, RowSettings
from dynalora.runtime.events import FinishEvent, GenerationResult, LoraEvent, TokenEvent
from dynalora.runtime.guard import GuardConfig
from dynalora.runtime.sampling import SamplingConfig
from dynalora.runtime.special_tokens import SHIFT_TOKEN, THINK_TOKEN, add_trigger_tokens
from dynalora.runtime.trained_trigger import TrainedTrigger
from dynalora.runtime.triggers import (EveryN, SpecialToken, Surprise, TokenProbability, TriggerConfig,
                                       TriggerPolicy, WindowPressure)

__all__ = ["KV_POLICIES", "Engine", "EngineConfig", "EveryN", "FinishEvent", "GenerationResult", "GuardConfig",
           "LoraEvent", "RowSettings", "SHIFT_TOKEN", "SamplingConfig", "SpecialToken", "Surprise", "THINK_TOKEN",
           "TokenEvent",
           "TokenProbability", "TrainedTrigger", "TriggerConfig", "TriggerPolicy", "WindowPressure",
           "add_trigger_tokens"]
