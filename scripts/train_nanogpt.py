#!/usr/bin/env python3
"""Train the seed character-level GPT ("Let's build GPT") on tiny Shakespeare and ship it.

The recipe is Karpathy's: vocabulary = the sorted set of the text's characters (65 for tiny
Shakespeare), the first 90% of the encoded text for training and the last 10% for validation,
``GPTConfig`` defaults (n_embd 384, n_head 6, n_layer 6, block_size 256, dropout 0.2),
batch 64, AdamW at lr 3e-4, 5000 iterations, seed 1337, and every 500 steps an
``estimate_loss`` over 200 random batches of each split. On CUDA the forward/backward passes
run under bf16 autocast while the master weights stay fp32. The state dict with the best
validation estimate is kept.

At the end the kept model is evaluated exactly, in fp32 and ``model.eval()``: the whole
validation split in non-overlapping windows of ``block_size`` characters (every position of
each window is predicted; the loss is the mean NLL over all predicted characters), and the
same over the train split's first 100k characters.

Outputs in ``--out``:

* ``model-00001-of-00002.safetensors``, ``model-00002-of-00002.safetensors`` — the
  ``state_dict()`` in float16, split by parameter into two shards;
* ``config.json`` — ``{"model_type": "nanogpt", "config": ..., "vocab": ..., "shards": [...]}``;
* ``train_log.json`` — the run's settings, losses, wall time, GPU, torch version and date.

Smoke test on CPU::

    python scripts/train_nanogpt.py --data src/kvant/assets/input.txt --out /tmp/ng \\
        --iters 2 --eval-iters 2

The script does not need ``kvant`` installed: it puts ``src`` on ``sys.path`` and, if the
package's ``__init__`` cannot be imported, loads ``kvant/model/nanogpt.py`` directly by path.
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _load_nanogpt():
    """Import ``kvant.model.nanogpt``; fall back to loading the file by path."""
    try:
        return importlib.import_module("kvant.model.nanogpt")
    except Exception:  # the package __init__ may pull in other things
        name = "_kvant_nanogpt_standalone"
        path = SRC / "kvant" / "model" / "nanogpt.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses need the module registered
        spec.loader.exec_module(mod)
        return mod


_ng = _load_nanogpt()
GPTConfig = _ng.GPTConfig
GPTLanguageModel = _ng.GPTLanguageModel
CharTokenizer = _ng.CharTokenizer

NUM_SHARDS = 2
SHARD_LIMIT = 16 * 1024 * 1024  # bytes of tensor data per shard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="text file (tiny Shakespeare input.txt)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--iters", type=int, default=5000, help="training iterations")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-interval", type=int, default=500)
    p.add_argument("--eval-iters", type=int, default=200, help="random batches per split per estimate")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--train-exact-chars", type=int, default=100_000,
                   help="exact loss over the train split's first N characters")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for the training loop (0 = none); past it, stop after a final "
                        "estimate and keep the best state so far")
    p.add_argument("--sample-chars", type=int, default=500, help="characters to sample at the end")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return p.parse_args(argv)


def get_batch(data: torch.Tensor, batch: int, block: int, gen: torch.Generator):
    """Random (x, y) windows; ``data`` and ``gen`` live on the same device."""
    ix = torch.randint(len(data) - block, (batch,), generator=gen, device=data.device)
    offs = torch.arange(block, device=data.device)
    x = data[ix[:, None] + offs]
    y = data[ix[:, None] + offs + 1]
    return x, y


@torch.no_grad()
def estimate_loss(model, splits: dict, batch: int, block: int, eval_iters: int,
                  gen: torch.Generator, autocast_ctx) -> dict:
    """Karpathy's estimate_loss: mean loss over ``eval_iters`` random batches of each split."""
    out = {}
    model.eval()
    for name, data in splits.items():
        losses = torch.zeros(eval_iters, device=data.device)
        for k in range(eval_iters):
            x, y = get_batch(data, batch, block, gen)
            with autocast_ctx():
                _, loss = model(x, y)
            losses[k] = loss.float()
        out[name] = losses.mean().item()
    model.train()
    return out


@torch.no_grad()
def exact_loss(model, data: torch.Tensor, block: int, chunk: int = 64) -> tuple[float, int, int]:
    """Mean NLL (nats/char) over ``data`` in non-overlapping windows of ``block`` characters.

    Window ``i`` reads ``data[i*block:(i+1)*block]`` and predicts ``data[i*block+1:(i+1)*block+1]``
    (every position). Runs in fp32 with ``model.eval()``. Returns (loss, windows, chars).
    """
    model.eval()
    n_win = (len(data) - 1) // block
    x_all = data[: n_win * block].view(n_win, block)
    y_all = data[1: n_win * block + 1].view(n_win, block)
    total = 0.0
    for i in range(0, n_win, chunk):
        x, y = x_all[i:i + chunk], y_all[i:i + chunk]
        logits = model(x).float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                 reduction="sum").item()
    chars = n_win * block
    return total / chars, n_win, chars


def split_shards(sd: dict, num_shards: int, limit: int) -> list[dict]:
    """Split a state dict by parameter, in order, into ``num_shards`` of about equal bytes."""
    sizes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    target = sum(sizes.values()) / num_shards
    shards: list[dict] = [{}]
    acc = 0
    for k, v in sd.items():
        if shards[-1] and acc + sizes[k] / 2 > target * len(shards) and len(shards) < num_shards:
            shards.append({})
        shards[-1][k] = v
        acc += sizes[k]
    while len(shards) < num_shards:  # tiny models: keep the file count fixed
        shards.append({})
    for i, s in enumerate(shards):
        b = sum(sizes[k] for k in s)
        if b > limit:
            raise RuntimeError(f"shard {i + 1} holds {b} bytes > limit {limit}")
    return shards


def save_model(model, tok, cfg, out: Path) -> list[str]:
    """Write the float16 safetensors shards and config.json; return the shard names."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    shards = split_shards(sd, NUM_SHARDS, SHARD_LIMIT)
    names = []
    for i, s in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{NUM_SHARDS:05d}.safetensors"
        save_file(s, str(out / name), metadata={"format": "pt"})
        names.append(name)
    conf = {"model_type": "nanogpt", "config": cfg.to_dict(), "vocab": tok.chars, "shards": names}
    (out / "config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
    return names


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed_all(args.seed)

    text = Path(args.data).read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    n = int(0.9 * len(data))
    train_data, val_data = data[:n].to(dev), data[n:].to(dev)
    print(f"text {len(text)} chars, vocab {tok.vocab_size}, train {len(train_data)}, "
          f"val {len(val_data)}, device {dev}")

    cfg = GPTConfig(vocab_size=tok.vocab_size)
    block = cfg.block_size
    model = GPTLanguageModel(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.3f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    use_bf16 = dev.type == "cuda"

    def autocast_ctx():
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16)

    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed)
    eval_gen = torch.Generator(device=dev)
    eval_gen.manual_seed(args.seed + 1)
    splits = {"train": train_data, "val": val_data}

    history = []
    best = {"val": math.inf, "train": math.inf, "step": -1}
    best_state = None
    stopped_early = False
    t_train = time.time()
    step = 0
    for step in range(args.iters + 1):
        last = step == args.iters
        over_budget = args.time_budget > 0 and (time.time() - t_train) > args.time_budget
        if step % args.eval_interval == 0 or last or over_budget:
            est = estimate_loss(model, splits, args.batch, block, args.eval_iters, eval_gen, autocast_ctx)
            el = time.time() - t_train
            history.append({"step": step, "train": est["train"], "val": est["val"], "elapsed_s": el})
            print(f"step {step}: train loss {est['train']:.4f}, val loss {est['val']:.4f} "
                  f"({el:.1f}s)")
            if est["val"] < best["val"]:
                best = {"val": est["val"], "train": est["train"], "step": step}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if over_budget and not last:
                stopped_early = True
                print(f"time budget {args.time_budget}s reached at step {step}; stopping")
                break
        if last:
            break
        x, y = get_batch(train_data, args.batch, block, gen)
        with autocast_ctx():
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.time() - t_train
    steps_done = step

    model.load_state_dict(best_state)
    model.eval()
    # exact fp32 evaluation (no autocast, full fp32 matmuls)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    val_exact, val_win, val_chars = exact_loss(model, val_data, block)
    tr_exact, tr_win, tr_chars = exact_loss(model, train_data[: args.train_exact_chars + 1], block)
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    print(f"exact val loss {val_exact:.4f} nats/char over {val_win} windows ({val_chars} chars)")
    print(f"exact train loss (first {args.train_exact_chars} chars) {tr_exact:.4f} over "
          f"{tr_win} windows ({tr_chars} chars)")

    # fp16 round trip: the shipped weights
    shard_names = save_model(model, tok, cfg, out)
    half_model = GPTLanguageModel(cfg).to(dev)
    half_model.load_state_dict({k: v.to(torch.float16).float() for k, v in model.state_dict().items()})
    val_exact_fp16w, _, _ = exact_loss(half_model, val_data, block)
    print(f"exact val loss of the fp16-rounded weights {val_exact_fp16w:.4f}")

    sample = ""
    if args.sample_chars > 0:
        g = torch.Generator(device=dev)
        g.manual_seed(args.seed)
        ctx = torch.zeros((1, 1), dtype=torch.long, device=dev)
        sample = tok.decode(model.generate(ctx, args.sample_chars, generator=g)[0].tolist())
        print("sample:\n" + sample)

    wall = time.time() - t_start
    log = {
        "model_type": "nanogpt",
        "config": cfg.to_dict(),
        "n_params": n_params,
        "data": {"file": Path(args.data).name, "chars": len(text), "vocab_size": tok.vocab_size,
                 "train_chars": len(train_data), "val_chars": len(val_data),
                 "split": "first 90% train, last 10% val"},
        "iters_requested": args.iters,
        "steps": steps_done,
        "stopped_early_time_budget": stopped_early,
        "batch": args.batch,
        "lr": args.lr,
        "optimizer": "AdamW (torch defaults: betas (0.9, 0.999), weight_decay 0.01)",
        "seed": args.seed,
        "precision": "bf16 autocast, fp32 master weights" if use_bf16 else "fp32",
        "eval_interval": args.eval_interval,
        "eval_iters": args.eval_iters,
        "estimate_precision": "bf16 autocast" if use_bf16 else "fp32",
        "best_step": best["step"],
        "final_train_loss_estimate": best["train"],
        "final_val_loss_estimate": best["val"],
        "final_estimates_note": "estimates at best_step (the kept state); the last step's are "
                                "history[-1]",
        "history": history,
        "exact_val_loss": val_exact,
        "exact_val_windows": val_win,
        "exact_val_chars": val_chars,
        "exact_val_loss_fp16_weights": val_exact_fp16w,
        "exact_train_loss": tr_exact,
        "exact_train_first_chars": args.train_exact_chars,
        "exact_train_windows": tr_win,
        "exact_train_chars": tr_chars,
        "exact_eval": f"fp32, model.eval(), non-overlapping windows of {block}, every position predicted",
        "train_seconds": train_seconds,
        "wall_time_s": wall,
        "device": dev.type,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "torch_version": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shards": shard_names,
        "sample": sample,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2, ensure_ascii=False) + "\n")
    print(f"saved {shard_names} + config.json + train_log.json to {out} (wall {wall:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
