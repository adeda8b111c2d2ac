from .config import ARCH_FIELDS, ModelConfig
from .model import KVCache, Transformer

__all__ = ["ModelConfig", "ARCH_FIELDS", "Transformer", "KVCache"]
