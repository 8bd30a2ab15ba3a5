"""Fine-tuning after rounding: scales, norms and biases move, integer codes never.

- block-wise, inside quantization: ``kvant.quantize(model, config, calib,
  kvant.EngineOptions(finetune=kvant.TuneConfig()))`` (:mod:`kvant.tune.blockwise`);
- end to end, after it: ``kvant.finetune(qmodel, float_model, calib, kvant.TuneConfig())``
  (:mod:`kvant.tune.e2e`).
"""

from kvant.tune.config import TuneConfig
from kvant.tune.e2e import calibration_kl, finetune

__all__ = ["TuneConfig", "calibration_kl", "finetune"]
