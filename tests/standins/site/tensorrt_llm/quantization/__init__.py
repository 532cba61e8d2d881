"""Stand-in for tensorrt_llm.quantization: QuantAlgo only."""
from .mode import QuantAlgo

__all__ = ["QuantAlgo"]
