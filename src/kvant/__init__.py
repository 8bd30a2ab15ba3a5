"""kvant: post-training weight-only quantization of transformer language models.

Public names::

    kvant.quantize(model, config, calib)        # in place, block by block
    kvant.save_quantized(model, "out/")         # packed safetensors + quantization_config
    kvant.load_quantized("out/")                # no calibration, identical outputs
    kvant.export_quantized(model, "out/", "gptq")  # the GPTQ / AWQ layout vLLM reads
    kvant.RTNConfig / GPTQConfig / QuantArgs    # frozen, versioned configs
"""

from kvant.config import (AWQConfig, ConfigError, EngineOptions, GPTQConfig, MethodConfig,
                          QuantArgs, RTNConfig, SpQRConfig)
from kvant.api import (calibration_for, evaluate, export_quantized, load_model,
                       load_quantized, quantize, save_quantized)
from kvant.calib.data import calibration_data
from kvant.eval.perplexity import perplexity

__all__ = [
    "AWQConfig", "ConfigError", "EngineOptions", "GPTQConfig", "MethodConfig", "QuantArgs",
    "RTNConfig", "SpQRConfig",
    "quantize", "save_quantized", "load_quantized", "export_quantized", "calibration_for",
    "evaluate",
    "load_model", "calibration_data", "perplexity",
]
__version__ = "0.1.0"
