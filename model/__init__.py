"""meshserve.model: the PaLM-style decoder (config, declared weights, int8, prefill/decode, sampling, checkpoints).

Heavy modules (JAX) are imported by their users; this package's public names are listed here.
"""

from meshserve.model.config import PRESETS, ConfigError, ModelConfig, get_config

__all__ = ["ModelConfig", "PRESETS", "get_config", "ConfigError"]
