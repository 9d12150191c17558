"""Deployable artifacts: ONNX (fp32, fp16, int8) with metadata, and a parity check against torch."""
