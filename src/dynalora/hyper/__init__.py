"""Hypernetworks: turn a state vector into a LoRA change."""

from dynalora.hyper.baselines import FixedSchedule, NearestPrototype
from dynalora.hyper.protocol import Hypernetwork, LoraUpdate, TriggerFeatures

__all__ = ["FixedSchedule", "Hypernetwork", "LoraUpdate", "NearestPrototype", "TriggerFeatures"]
