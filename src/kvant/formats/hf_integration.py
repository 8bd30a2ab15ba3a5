"""transformers integration: ``AutoModelForCausalLM.from_pretrained`` reads kvant checkpoints
and ``save_pretrained`` writes quantized models that load back.

After ``import kvant`` (which calls :func:`register` when transformers is imported, at
once or later: kvant.formats.hf_hook):

- ``AutoModelForCausalLM.from_pretrained(dir)`` of a kvant checkpoint (what
  ``kvant.save_quantized`` / ``kvant quantize`` write: config.json with ``model_type: "hf"``,
  docs/FORMAT.md) builds the Hugging Face model of its ``model_config`` with kvant's
  ``QuantLinear`` layers in place and loads the packed tensors into them. transformers reads
  kvant's config.json through an AutoConfig entry for model type ``"hf"`` (:class:`
  KvantCheckpointConfig`, which hands back the real architecture's config, with config.json's
  own checksum verified), then its quantizer hooks build the layers
  (:class:`KvantHfQuantizer`, registered as quant method ``"kvant"``). It finds the shards
  through ``model.safetensors.index.json``, which kvant writes beside config.json (a
  multi-shard checkpoint written before that index existed: load it with
  ``kvant.load_quantized``). The layers' values are checked as kvant's loader checks them
  (``integrity.check_layer``); the per-tensor checksums are compared by
  ``kvant.load_quantized`` only.
- A model quantized by ``kvant.quantize`` (or loaded either way) carries the quantizer:
  ``model.save_pretrained(dir)`` writes a transformers-layout directory (the architecture's
  config.json whose ``quantization_config`` is ``{"quant_method": "kvant", "format":
  "kvant-hf", <method fields>, "modules": {layer: its kind and shape}}``, and the model's own
  state dict: packed ``qweight``/``qzeros``/``scales``... per layer) that the same hooks load
  back. What it cannot write faithfully it refuses (fused sibling layers, an inference-time
  transform). Before this module, save_pretrained wrote the packed buffers without a
  quantization_config, and reloading gave freshly initialised random Linear weights.
"""

from __future__ import annotations

import torch.nn as nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from kvant.errors import CheckpointError, KvantError

QUANT_METHOD = "kvant"
HF_FORMAT = "kvant-hf"  # quantization_config["format"] of a save_pretrained directory
HF_FORMAT_VERSION = 1
# quantization_config keys that are not method-config fields
_LAYOUT_KEYS = ("quant_method", "format", "format_version", "modules", "ignored_modules",
                "mixed_plan", "finetune")


def method_config(qc: dict):
    """The kvant method config (``kvant.MethodConfig``) of a quantization_config dict."""
    from kvant.algorithms.registry import config_from_dict

    return config_from_dict({k: v for k, v in qc.items() if k not in _LAYOUT_KEYS})


def module_entries(model: nn.Module) -> dict:
    """name -> {"kind", constructor arguments} of every quantized layer (what rebuilds it)."""
    from kvant.nn.qlinear import QuantLinear

    return {name: {"kind": m.kind, **m.init_kwargs()}
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def attach(model: nn.Module) -> bool:
    """Give a kvant-quantized transformers model the quantizer and ``quantization_config``
    that make ``save_pretrained`` write a directory that loads back (no-op and False for a
    model that is not a transformers ``PreTrainedModel`` or not quantized by kvant)."""
    config = getattr(model, "kvant_quantization_config", None)
    if config is None or not isinstance(model, PreTrainedModel):
        return False
    register()
    qc = KvantHfConfig.from_dict({**config.to_dict(), "modules": module_entries(model)})
    model.config.quantization_config = qc
    # only the quantizer, not transformers' ``is_quantized`` flag (which would refuse
    # ``.half()``/``.float()`` that kvant's own code and users call on these models)
    model.hf_quantizer = KvantHfQuantizer(qc, pre_quantized=True)
    return True


class KvantHfConfig(QuantizationConfigMixin):
    """transformers' view of a kvant quantization_config: the method fields (bits,
    group_size, ...) and ``modules``, each quantized layer's kind and shape."""

    def __init__(self, modules: dict | None = None, **fields):
        self.quant_method = QUANT_METHOD
        fields.pop("quant_method", None)
        if not isinstance(modules, dict) or not modules:
            raise CheckpointError("a kvant quantization_config needs 'modules', the "
                                  "quantized layers; this one has none")
        self.modules = modules
        self.fields = {k: v for k, v in fields.items() if k not in _LAYOUT_KEYS}
        try:
            self.method = method_config(self.fields)
        except (KvantError, ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"kvant quantization_config is invalid: {e}") from None

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """From config.json's ``quantization_config`` (either kvant layout)."""
        config = cls(**dict(config_dict))
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        """The transformers-layout quantization_config written by save_pretrained."""
        return {"quant_method": QUANT_METHOD, "format": HF_FORMAT,
                "format_version": HF_FORMAT_VERSION, **self.fields,
                "modules": self.modules}

    def to_diff_dict(self) -> dict:
        return self.to_dict()


class KvantHfQuantizer(HfQuantizer):
    """Builds kvant's layers before transformers loads the packed tensors into them."""

    requires_calibration = True  # transformers cannot quantize with kvant on load

    def _process_model_before_weight_loading(self, model, **kwargs):
        from kvant.formats.checkpoint import install_quant_shells

        install_quant_shells(model, self.quantization_config.modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from kvant.formats import integrity
        from kvant.nn.qlinear import QuantLinear, prepare_for_inference

        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                integrity.check_layer(name, m)
        model.kvant_quantization_config = self.quantization_config.method
        prepare_for_inference(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """At save_pretrained: refuse what would not load back; refresh ``modules``."""
        from kvant.nn.fuse import FusedSlice

        fused = [n for n, m in model.named_modules() if isinstance(m, FusedSlice)]
        if fused:
            raise KvantError(f"save_pretrained: fused sibling layers ({fused[0]}, ...) are "
                             "an inference-time transform; save the model before "
                             "kvant.nn.fuse.fuse_siblings")
        self.quantization_config.modules = module_entries(model)
        return None, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


class KvantCheckpointConfig(PretrainedConfig):
    """AutoConfig entry for kvant's own config.json (``model_type: "hf"``): loading it
    returns the real architecture's config with a kvant ``quantization_config``."""

    model_type = "hf"

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        from kvant.formats import integrity

        qc = config_dict.get("quantization_config")
        spec = config_dict.get("model_config")
        if not isinstance(qc, dict) or qc.get("format") != "kvant" or not isinstance(
                spec, dict) or not isinstance(spec.get("config"), dict):
            raise CheckpointError("config.json says model_type 'hf' but is not a kvant "
                                  "checkpoint's (no kvant quantization_config or "
                                  "model_config)")
        if "integrity" in config_dict:
            integrity.check_config(config_dict, "kvant checkpoint")
        cfg = dict(spec["config"])
        model_type = cfg.pop("model_type", spec.get("model_type"))
        if model_type not in CONFIG_MAPPING:
            raise CheckpointError(f"kvant checkpoint of model type {model_type!r}, which "
                                  "this transformers does not know")
        cfg["quantization_config"] = {**qc, "quant_method": QUANT_METHOD}
        cfg.setdefault("dtype", spec.get("dtype"))
        return CONFIG_MAPPING[model_type].from_dict(cfg, **kwargs)


def register() -> None:
    """Register kvant's config, quantizer and AutoConfig entry with transformers (idempotent;
    ``import kvant`` arranges the call for when transformers is imported)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(KvantHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(KvantHfQuantizer)
    if "hf" not in CONFIG_MAPPING:
        AutoConfig.register("hf", KvantCheckpointConfig)
