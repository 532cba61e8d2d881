"""Compile stage: TensorRT-LLM artifacts per GPU architecture.

Not built yet: the engine builds per SM (trtllm-build / PyTorch-backend
options) arrive with the compile issue. Nothing in kiln calls this package yet.
"""
