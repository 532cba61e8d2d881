"""Stand-in for tensorrt_llm.quantization.mode.QuantAlgo: a str enum, so an unknown name raises ValueError as there.

The members are the names ModelOpt writes to hf_quant_config.json for kiln's formats (tensorrt_llm/quantization/
mode.py QuantAlgo holds these among others)."""
from enum import Enum


class QuantAlgo(str, Enum):
    W8A16 = "W8A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    NVFP4 = "NVFP4"
    INT8 = "INT8"
    MIXED_PRECISION = "MIXED_PRECISION"
