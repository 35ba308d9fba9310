"""tunegraph: LLM post-training from Axolotl-style YAML recipes, every stage a Dagster asset."""

__version__ = "0.1.0"
