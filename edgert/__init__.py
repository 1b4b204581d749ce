"""edgert: edge and on-device LLM inference runtime."""

__version__ = "0.1.0"
