"""Training recipes: thin loops over the library's building blocks, each driven by a config dataclass."""
