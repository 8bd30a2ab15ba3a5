"""Running quantized models: greedy generation with a static cache, compiled decode steps
and CUDA graphs (:mod:`kvant.serve.generate`)."""

from kvant.serve.generate import DecodeStats, GenerateError, StaticDecoder, decode_speed, generate

__all__ = ["DecodeStats", "GenerateError", "StaticDecoder", "decode_speed", "generate"]
