"""``kvant generate``: try a (quantized) model: greedy continuation of a prompt, tokens/s."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    """Register ``generate`` on the ``kvant`` subcommand parser ``sub``."""
    g = sub.add_parser("generate", help="greedy generation from a kvant checkpoint (or any "
                                        "model kvant loads), with tokens/s")
    g.add_argument("model", help="a kvant checkpoint directory (or an HF dir, .gguf, nanogpt)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to continue (needs the model's tokenizer)")
    src.add_argument("--prompt-len", type=int,
                     help="a random prompt of this many token ids (shape-only checkpoints)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together")
    g.add_argument("--ctx", type=int, default=None,
                   help="KV-cache length (default: prompt + new tokens)")
    g.add_argument("--device", default=None, help="default cuda if present")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step before capturing it (GPU)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip comparing the checkpoint with its checksums (trusted files)")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Load, prefill, decode; print the text (when there is a tokenizer) and the speed."""
    import torch

    import kvant
    from kvant.cli import check_positive_flags
    from kvant.config import check_device
    from kvant.errors import InputError

    check_device(args.device)
    check_positive_flags(args, "max_new_tokens", "batch", "prompt_len", "ctx")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # serving: each packed weight once on the GPU (the kernels' layout), the stored copy on
    # the host (KernelOptions.stored_on_host)
    model, tok = kvant.load_model(args.model, device=device, verify=not args.no_verify,
                                  kernel_options=kvant.KernelOptions(stored_on_host=True))
    if args.prompt is not None:
        if tok is None:
            raise InputError(f"{args.model} has no tokenizer: use --prompt-len N for a random "
                             "prompt of N token ids")
        ids = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
        if ids.numel() == 0:
            raise InputError("--prompt encodes to no tokens")
    else:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 256
        ids = torch.randint(0, vocab, (1, args.prompt_len),
                            generator=torch.Generator().manual_seed(0))
    ids = ids.repeat(args.batch, 1)
    out, stats = kvant.generate(model, ids, args.max_new_tokens, ctx=args.ctx,
                                compile=args.compile)
    new = out[0, ids.shape[1]:].tolist()
    text = tok.decode(new) if tok is not None and hasattr(tok, "decode") else None
    res = {"prompt_tokens": ids.shape[1], "new_tokens": len(new), "batch": args.batch,
           "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
           "tokens_per_s": stats.tokens_per_s, "device": device, "tokens": new, "text": text}
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    if text is not None:
        print(text)
    else:
        print(" ".join(map(str, new)))
    print(f"prefill {ids.shape[1]} tokens x {args.batch}: {stats.prefill_s:.3f}s; decode "
          f"{len(new)} tokens: {stats.tokens_per_s:.1f} tokens/s (batch {args.batch}, {device})")
    return 0
