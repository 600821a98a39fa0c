"""palm-pipeline: PaLM pretraining as a configuration-driven workflow."""

__version__ = "0.1.0"
