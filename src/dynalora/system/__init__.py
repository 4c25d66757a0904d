"""System assembly: a base model with its bank, hypernetworks, triggers and memory, loaded from checkpoints and
scored the way the evaluations and the engine use them (above ``runtime``, below the recipes, evals and CLI)."""
