"""An OpenAI-compatible server over the engine (``dynalora serve``)."""
