"""``kvant quantize``: flags to configs (method, mixed precision, fine-tuning), the checks done
before the model is loaded, the run (streamed to disk or whole) and its printed summary."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time


def config_from_args(args):
    """The method config from the flags the user gave; a flag left unset keeps the method's
    own default (SpQR's bits=3, group_size=16, not the flags' usual 4 and 128)."""
    from kvant.algorithms.registry import parse_value, add_field, config_class
    from kvant.config import ConfigError

    cls = config_class(args.method)
    fields: dict = {}
    known = {f.name for f in dataclasses.fields(cls)}
    for name in ("bits", "group_size", "sym", "clip", "act_order", "static_groups",
                 "damp_percent", "sink_weight", "sink_max_share",
                 "true_sequential", "quantize_head", "grid", "gguf_mix"):
        val = getattr(args, name)
        if val is not None:
            if name not in known:
                raise ConfigError(f"--{name.replace('_', '-')} does not apply to "
                                  f"method {args.method!r}")
            fields[name] = val
    for item in args.option or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--option {item!r}: expected key=value")
        key = key.strip()
        if key in fields and key != "ignore":
            raise ConfigError(f"{key!r} is set twice (by its flag or an earlier --option, "
                              f"{fields[key]!r}, and by --option {item!r})")
        add_field(fields, key, parse_value(value.strip()), "the --option flags")
    return cls.from_dict(fields)


def check_positive_flags(args, *names: str) -> None:
    """Refuse a given flag among ``names`` that is zero or negative (unset flags pass)."""
    from kvant.errors import InputError

    for name in names:
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def cmd_quantize(args) -> int:
    import kvant
    from kvant.algorithms.registry import needs_calibration
    from kvant.config import EngineOptions
    from kvant.formats.stream import finished_blocks
    from kvant.model.lazy import streamable

    # everything that can be checked without the model, before loading it
    config = config_from_args(args)
    mixed = _mixed_from_args(args)  # --target-bpw: kvant.calib.plan.MixedConfig or None
    if mixed is not None:
        mixed.candidates(config)  # a width or method no candidate takes: refused before loading
    tune = _tune_from_args(args)  # --finetune: kvant.TuneConfig or None
    block_tune = tune if args.finetune in ("block", "both") else None
    options = EngineOptions(device=args.device, show_progress=not args.json,  # checks device
                            finetune=block_tune)
    check_positive_flags(args, "n_samples", "seq_len")
    # with --distributed (under torchrun) every rank runs this; rank 0 owns the output
    from kvant.calib import dist as kdist

    rank = kdist.rank() if args.distributed and kvant.init_distributed(args.device) else 0
    if rank:
        options = EngineOptions(device=args.device, show_progress=False, finetune=block_tune)
    # a local safetensors directory streams: block by block to disk, resumable (also under
    # torchrun: rank 0 writes, every rank keeps its share of the activations for a resume)
    stream = args.stream and streamable(args.model)
    if mixed is not None and stream:
        from kvant.errors import InputError

        raise InputError("--target-bpw does not stream blocks from disk yet: add --no-stream "
                         "(the model is then loaded whole)")
    if args.finetune in ("e2e", "both") and (stream or kdist.active()):
        from kvant.errors import InputError

        raise InputError(f"--finetune {args.finetune} keeps a float copy of the whole model "
                         "in one process: add --no-stream, and run without --distributed")
    if stream and getattr(config, "quantize_head", False) and needs_calibration(config):
        from kvant.errors import InputError  # refused before any work (kvant.calib.head)

        raise InputError(f"--quantize-head with {config.method!r} calibrates the head on the "
                         "whole model, which streaming does not hold: add --no-stream (the "
                         "model is then loaded whole), or use --method rtn")
    with _output_guard(args, args.model) if not rank else contextlib.nullcontext():
        model, tok = kvant.load_model(args.model, device="cpu", lazy=stream)
        if stream and _stacked_experts(model):  # MoE: not streamable yet (docs/MOE.md)
            if not args.json:
                print("kvant: this model stores its experts as stacked 3-D weights, which "
                      "are not streamed yet: loading it whole", file=sys.stderr)
            model, tok = kvant.load_model(args.model, device="cpu")
            stream = False
        calib = None
        float_model = copy.deepcopy(model) if args.finetune in ("e2e", "both") else None
        if needs_calibration(config) or mixed is not None or tune is not None:
            _check_calibration_memory(model, args, options)
            calib = kvant.calibration_for(model, tok, args.calib, n_samples=args.n_samples,
                                          seq_len=args.seq_len, seed=args.seed,
                                          calib_file=args.calib_file,
                                          chat_file=args.calib_chat)
        t0 = time.perf_counter()
        if stream:
            done = finished_blocks(args.out)
            if done and not args.json:
                print(f"kvant: resuming {args.out} after {done} finished blocks",
                      file=sys.stderr)
            report, out = kvant.quantize_streaming(model, config, calib, args.out, tok,
                                                   options, overwrite=args.overwrite,
                                                   sources=[args.model])
        else:
            report = kvant.quantize(model, config, calib, options, mixed=mixed)
            tuned = _finetune_e2e(model, float_model, calib, tune, options, args)
            out = kvant.save_quantized(model, args.out, tok, overwrite=args.overwrite,
                                       source=args.model)
    result = {"out": str(out), "config": config.to_dict(), "seconds": time.perf_counter() - t0,
              "layers": len(report.layers), "n_calib": report.n_calib}
    if report.plan is not None:
        result["mixed_plan"] = report.plan.to_dict()
    if block_tune is not None:
        result["finetune_block"] = [b["finetune"] for b in report.blocks if "finetune" in b]
    if float_model is not None:
        result["finetune_e2e"] = tuned
    if report.moe:
        result["moe"] = report.moe
    if rank:
        return 0
    from kvant.formats.checkpoint import read_config
    from kvant.formats.summary import checkpoint_summary, format_summary

    summary = checkpoint_summary(out, read_config(out, verify=False))  # just written
    if args.json:
        print(json.dumps({**result, "summary": summary}, indent=1))
        return 0
    print(f"quantized {len(report.layers)} layers with {config.method} in "
          f"{result['seconds']:.1f}s -> {out}")
    if report.plan is not None and not args.json:
        print("\n".join(report.plan.lines()))
    for line in format_summary(summary):
        print("  " + line)
    if report.moe:  # issue 19: the few-token fallback is counted, never silent
        m = report.moe
        limit = (f"{m['min_tokens']} calibration tokens" if isinstance(m["min_tokens"], int)
                 else "as many calibration tokens as their input width")
        print(f"  experts: {m['expert_layers']} expert layers, each calibrated on its own "
              f"routed tokens (routers float); {m['expert_layers_few_tokens']} of them got "
              f"fewer than {limit} and were rounded to nearest (docs/MOE.md)")
    return 0


def _stacked_experts(model) -> bool:
    """Whether a (lazily loaded) model holds 3-D expert stacks, which only a whole model
    can quantize."""
    from kvant.model.moe import find_fused_stacks

    return bool(find_fused_stacks(model))


def _tune_from_args(args):
    """The TuneConfig of --finetune / --finetune-steps / --finetune-tokens, or None without
    --finetune (the other two then must not be given)."""
    knobs = {k: v for k, v in (("steps", args.finetune_steps),
                               ("tokens", args.finetune_tokens)) if v is not None}
    if args.finetune is None:
        if knobs:
            from kvant.errors import InputError

            raise InputError("--finetune-steps / --finetune-tokens only apply with --finetune")
        return None
    from kvant.tune import TuneConfig

    return TuneConfig(**knobs)  # bad values: ConfigError, one line


def _finetune_e2e(model, float_model, calib, tune, options, args) -> dict | None:
    """--finetune e2e|both: tune the quantized model toward ``float_model`` on the
    calibration tokens (kvant.finetune) on the compute device, then back to the host."""
    if float_model is None:
        return None
    import kvant
    from kvant.calib.engine import resolve_device

    device = resolve_device(options.device)
    model.to(device)
    float_model.to(device)
    try:
        report = kvant.finetune(model, float_model, calib, tune, show_progress=not args.json)
    finally:
        model.to("cpu")
    if not args.json:
        print(f"fine-tuned end to end on {report['tokens']} calibration tokens in "
              f"{report['seconds']:.1f}s: calibration KL {report['kl_before']:.4f} -> "
              f"{report['kl_after']:.4f}", file=sys.stderr)
    return report


def _mixed_from_args(args):
    """The MixedConfig of --target-bpw / --widths / --mixed-group-sizes / --sensitivity /
    --mixed-methods, or None without --target-bpw (the others then must not be given)."""
    from kvant.calib.plan import MixedConfig
    from kvant.errors import InputError

    extra = [f for f, v in (("--widths", args.widths), ("--mixed-group-sizes",
             args.mixed_group_sizes), ("--sensitivity", args.sensitivity),
             ("--mixed-methods", args.mixed_methods)) if v is not None]
    if args.target_bpw is None:
        if extra:
            raise InputError(f"{', '.join(extra)} only apply with --target-bpw")
        return None

    def ints(text, flag):
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise InputError(f"{flag} must be a comma-separated list of integers, "
                             f"got {text!r}") from None

    fields = {"target_bpw": args.target_bpw}
    if args.widths is not None:
        fields["widths"] = ints(args.widths, "--widths")
    if args.mixed_group_sizes is not None:
        fields["group_sizes"] = ints(args.mixed_group_sizes, "--mixed-group-sizes")
    if args.sensitivity is not None:
        fields["sensitivity"] = args.sensitivity
    if args.mixed_methods is not None:
        fields["methods"] = tuple(m.strip() for m in args.mixed_methods.split(",") if m.strip())
    return MixedConfig(**fields)


def _output_guard(args, source):
    """Refuse a bad ``--out`` before any work (kvant.formats.outdir.check_output) and hold
    its lock for the whole run, so a second run on the same output fails at once."""
    from kvant.formats.outdir import reserve

    return reserve(args.out, overwrite=args.overwrite, sources=[source])


def _check_calibration_memory(model, args, options) -> None:
    """Refuse (kvant.calib.budget) before the calibration windows are even drawn."""
    from kvant.calib.budget import check_memory
    from kvant.calib.data import resolve_seq_len
    from kvant.model.discovery import find_blocks

    # the seq_len calibration_for will use; a too long window is a clearer error than its
    # memory
    seq_len = resolve_seq_len(model, args.seq_len)
    check_memory(model, find_blocks(model)[1], args.n_samples, seq_len, options.device,
                 options.batch_size)
