"""One rank of the distributed tests: ``python dist_worker.py CASE OUT``, started once per
rank by tests/test_distributed.py with the environment torchrun would set (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Cases:
- ``quality``: the embedded nanoGPT model quantized with GPTQ and with RTN; rank 0 saves both
  checkpoints (``OUT/gptq``, ``OUT/rtn``); every rank writes its packed integer codes, its
  report and the perplexity to ``OUT/rank{r}.pt``. :func:`quantize_embedded` is also what
  the test runs in one process for the reference.
- ``methods``: a tiny model quantized with QuIP and with SpQR (results with extra tensors);
  every rank writes its logits on fixed tokens to ``OUT/rank{r}.pt`` (:func:`tiny_methods`
  is also the one-process reference), and the error AWQ gets.
- ``stream SRC [KILL_AFTER]``: the sharded tiny Llama in SRC streamed with GPTQ into
  ``OUT/q`` (:func:`streamed`, also the one-process reference); rank 0 SIGKILLs itself once
  the record of block KILL_AFTER is on disk. Every rank writes ``OUT/rank{r}.txt``: "ok" and
  its layer count, or the error it got.
- ``cli SRC``: ``kvant quantize SRC --distributed`` (streams: SRC is a safetensors
  directory) into ``OUT/cli``; every rank writes its exit code to ``OUT/rank{r}.txt``.
- ``raise``: a tiny model; rank 1 raises while quantizing its first layer.
- ``die``: a tiny model; rank 1 exits (``os._exit``) while observing calibration inputs.
In the failure cases every rank writes the error it got to ``OUT/rank{r}.txt`` after trying
to save ``OUT/ckpt`` (which must never appear).
"""

import os
import signal
import sys

import torch

import kvant
import kvant.algorithms.registry
from kvant.model.nanogpt import GPTConfig, GPTLanguageModel, load_embedded
from kvant.nn.qlinear import QuantLinear

OPTS = kvant.EngineOptions(device="cpu", show_progress=False, batch_size=8)
# A float64 Hessian: GPTQ's integers flip on any 1-ulp change of a float32 H (a different
# batch size alone changes most layers), so only this shows "identical up to reduction order"
CONFIGS = {"gptq": kvant.GPTQConfig(bits=4, group_size=128, hessian_dtype="float64"),
           "rtn": kvant.RTNConfig(bits=4, group_size=128)}
# 15 samples: shards of 7 and 8 (unequal, so the counts must weight the reduction), batches
# unlike the one-process run's (8 + 7); 100 tokens: the row counts are no powers of two
N_SAMPLES, SEQ_LEN, EVAL_WINDOWS = 15, 100, 8


def codes(model) -> dict:
    """Packed integer codes per layer (packing is one-to-one: equal codes, equal words)."""
    return {n: m.qweight.clone() for n, m in model.named_modules()
            if isinstance(m, QuantLinear)}


def quantize_embedded(method: str, out_dir: str | None = None) -> dict:
    """Quantize the embedded model -> codes, report layers, perplexity (and save it)."""
    model, tok = load_embedded()
    cfg = CONFIGS[method]
    calib = kvant.calibration_for(model, tok, n_samples=N_SAMPLES, seq_len=SEQ_LEN, seed=0)
    rep = kvant.quantize(model, cfg, calib if method == "gptq" else None, OPTS)
    if out_dir is not None:
        kvant.save_quantized(model, out_dir, tok)
    return {"codes": codes(model), "layers": rep.layers,
            "ppl": kvant.evaluate(model, tok, max_windows=EVAL_WINDOWS)["ppl"]}


def tiny() -> tuple:
    """A 2-block random nanoGPT (n_embd 64) and 8 random calibration windows of 32."""
    torch.manual_seed(0)
    model = GPTLanguageModel(GPTConfig(vocab_size=65, n_embd=64, n_head=2, n_layer=2,
                                       block_size=32, dropout=0.0)).eval()
    return model, torch.randint(0, 65, (8, 32), generator=torch.Generator().manual_seed(1))


TINY_METHODS = {"quip": kvant.algorithms.registry.config_from_spec("quip:bits=2,group_size=32"),
                "spqr": kvant.SpQRConfig(bits=3, group_size=16, outlier_budget=0.01)}


def tiny_methods() -> dict:
    """method -> (logits of the quantized tiny model on fixed tokens, report layers)."""
    out = {}
    x = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(2))
    for name, cfg in TINY_METHODS.items():
        model, calib = tiny()
        rep = kvant.quantize(model, cfg, calib, OPTS)
        with torch.no_grad():
            y = model(x)
        out[name] = (y[0] if isinstance(y, tuple) else y, rep.layers)
    return out


STREAM_GPTQ = kvant.GPTQConfig(bits=3, group_size=32, act_order=True, hessian_dtype="float64")


def streamed(src: str, out: str, kill_after: int = -1):
    """Stream the tiny Llama in ``src`` into ``out`` (GPTQ, 9 calibration samples: shards of
    4 and 5 on two ranks); rank 0 dies by SIGKILL after block ``kill_after`` is recorded."""
    from kvant.calib.streaming import quantize_streaming

    def die(i):
        if i == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    calib = torch.randint(0, 300, (9, 32), generator=torch.Generator().manual_seed(0))
    model, tok = kvant.load_model(src, dtype=torch.float32, lazy=True)
    return quantize_streaming(model, STREAM_GPTQ, calib, out, tok, OPTS, on_block=die)[0]


def failure(case: str, out: str, rank: int) -> None:
    model, calib = tiny()
    import kvant.algorithms.gptq as g

    if rank == 1 and case == "raise":
        def broken(*a, **k):
            raise RuntimeError("injected failure")
        g.gptq_quantize = broken
    if rank == 1 and case == "die":
        g._GPTQLayer.observe = lambda self, x: os._exit(3)
    msg = "no error"
    try:
        kvant.quantize(model, kvant.GPTQConfig(bits=4, group_size=32), calib, OPTS)
        kvant.save_quantized(model, os.path.join(out, "ckpt"), load_embedded()[1])
    except Exception as e:  # the test reads what each rank got
        msg = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(msg)


def main(case: str, out: str, *extra: str) -> None:
    torch.set_num_threads(1)
    assert kvant.init_distributed(device="cpu", timeout_s=60)
    rank = torch.distributed.get_rank()
    if case == "quality":
        res = {m: quantize_embedded(m, os.path.join(out, m)) for m in CONFIGS}
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    elif case == "methods":
        res = tiny_methods()
        model, calib = tiny()
        try:
            kvant.quantize(model, kvant.AWQConfig(bits=4, group_size=32), calib, OPTS)
            res["awq"] = "no error"
        except Exception as e:
            res["awq"] = f"{type(e).__name__}: {e}"
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    elif case == "cli":
        from kvant.cli import main as cli

        text = os.path.join(out, f"calib{rank}.txt")
        with open(text, "w") as f:  # the same text on every rank
            f.write(" ".join(f"word{i % 97} and more text {i}" for i in range(2000)))
        rc = cli(["quantize", extra[0], "--distributed", "--method", "gptq", "--bits", "3",
                  "--group-size", "32", "--n-samples", "9", "--seq-len", "32", "--calib",
                  text, "--device", "cpu", "--out", os.path.join(out, "cli"), "--json"])
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(f"rc {rc}")
    elif case == "stream":
        try:
            rep = streamed(extra[0], os.path.join(out, "q"), int(extra[1]) if extra[1:] else -1)
            msg = f"ok {len(rep.layers)}"
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(msg)
    else:
        failure(case, out, rank)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
