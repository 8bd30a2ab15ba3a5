"""kvant: post-training weight-only quantization of transformer language models.

Public names::

    kvant.quantize(model, config, calib)        # in place, block by block
    kvant.quantize_streaming(model, config, calib, "out/")  # lazy model -> disk, resumable
    kvant.init_distributed()                    # under torchrun: ranks share the work
    kvant.save_quantized(model, "out/")         # packed safetensors + quantization_config
    kvant.load_quantized("out/")                # no calibration, identical outputs
    kvant.prepare_for_inference(model, "cuda")  # GPU kernel layout, once (load does it)
    kvant.export_quantized(model, "out/", "gptq")  # the GPTQ / AWQ layout vLLM reads
    kvant.export_gguf(model, "m.gguf", type="Q4_K")  # llama.cpp / ollama (grid="gguf:Q4_K")
    kvant.generate(model, ids, 32)              # greedy, static cache, CUDA graphs on GPU
    kvant.RTNConfig / GPTQConfig / QuantArgs    # frozen, versioned configs
    kvant.quantize(model, config, calib, target_bpw=3.0)  # mixed widths to a size
    kvant.EngineOptions(finetune=kvant.TuneConfig())  # tune scales/norms per block after rounding
    kvant.finetune(qmodel, float_model, calib)  # then end to end: KL to the float model
"""

from kvant.config import (AWQConfig, ConfigError, EngineOptions, GPTQConfig, MethodConfig,
                          QuantArgs, RTNConfig, SpQRConfig)
from kvant.api import (calibration_for, evaluate, export_gguf, export_quantized, load_model,
                       load_quantized, prepare_for_inference, quantize, save_quantized)
from kvant.calib.data import calibration_data
from kvant.calib.plan import MixedConfig, MixedPlan
from kvant.calib.dist import init_distributed
from kvant.calib.streaming import quantize_streaming
from kvant.kernels.options import KernelOptions
from kvant.eval.perplexity import perplexity
from kvant.serve import generate
from kvant.tune import TuneConfig, finetune

__all__ = [
    "AWQConfig", "ConfigError", "EngineOptions", "GPTQConfig", "MethodConfig", "QuantArgs",
    "RTNConfig", "SpQRConfig",
    "MixedConfig", "MixedPlan",
    "quantize", "save_quantized", "load_quantized", "export_quantized", "export_gguf",
    "calibration_for",
    "evaluate", "prepare_for_inference", "KernelOptions",
    "load_model", "calibration_data", "perplexity", "init_distributed",
    "quantize_streaming", "generate", "TuneConfig", "finetune",
]
__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """AutoModelForCausalLM.from_pretrained of kvant checkpoints, save_pretrained of kvant
    models (kvant.formats.hf_integration): registered now when transformers is imported,
    else when it is (kvant.formats.hf_hook), so ``import kvant`` does not import it."""
    from kvant.formats import hf_hook

    hf_hook.install()


_register_with_transformers()
