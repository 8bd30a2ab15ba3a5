"""Decode tokens/s, fp16 vs weight-only 4-bit, each step one replayed CUDA graph (issue 8).

Default model: a Llama-2-7B-shaped LlamaForCausalLM (32 blocks, d 4096, 11008 intermediate,
32 heads, vocab 32000) with random fp16 weights (``--shape smollm2-135m``: SmolLM2-135M's
shapes). It is timed in fp16, then every Linear of
its blocks is quantized with kvant's RTN grid (``core.grid.rtn``, asymmetric, ``--bits``
``--group-size``; lm_head stays fp16, as usual) into packed QuantLinears, and timed again.

A decode step is captured once as a CUDA graph (one token per sequence, a static KV cache of
``--ctx`` positions, attention masked to the positions written so far) and replayed; the
step runs the HF decoder layers directly with our own position and mask tensors, so no
host-side logic of the HF top-level forward runs inside the graph. tokens/s = batch x steps /
time. Our kernels are tuned for the model's shapes and the batch before capture. With
``--compile`` the step is torch.compile-d (one graph, no break: the cache is initialised by
an eager step first) before the capture; ``--fuse`` runs q/k/v and gate/up as one layer.

``--model`` takes any HF causal-LM directory (timed in fp16, then RTN-quantized) or a kvant
checkpoint (timed as stored; no fp16 row). Writes benchmarks/results/decode.{json,md}.

Usage: ``PYTHONPATH=src python3 benchmarks/decode.py [--batches 1,8] [--model DIR|GGUF]
[--shape NAME] [--fuse] [--compile] [--name STEM]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
from kernel_table import _clone, _copies, tune_graph  # noqa: E402  (shared helpers)
from kvant.serve.generate import capture_graph  # noqa: E402

from kvant.serve import StaticDecoder  # noqa: E402


# random-weight shapes (the time of a step does not depend on the values)
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    # SmolLM2-135M's config: 30 blocks, d 576, 9 query / 3 key-value heads, tied embeddings
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    # Llama-3-70B: too large for an fp16 copy next to anything else; built block by block
    # and quantized as it is made (random_llama_quantized), no float row
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0),
}


def random_llama(shape: str, layers: int = 0):
    """Random fp16 LlamaForCausalLM with the shapes of ``SHAPES[shape]`` (``layers`` > 0
    overrides the block count), on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(max_position_embeddings=4096, **kw)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


@torch.no_grad()
def random_llama_quantized(shape: str, layers: int, bits: int, group_size: int, options):
    """Random LlamaForCausalLM of ``SHAPES[shape]`` made on the GPU one block at a time, each
    block's Linears RTN-quantized (:func:`rtn_quantize_`, prepared with ``options``) before
    the next is made: the fp16 model never exists whole (a 70B shape's would not fit)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(max_position_embeddings=4096, **kw)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.float16)
    g = torch.Generator(device="cuda").manual_seed(0)

    def make(mod: nn.Module) -> None:
        mod.to_empty(device="cuda", recurse=False)
        for name, t in mod.named_parameters(recurse=False):
            if name == "weight" and t.dim() == 1:  # RMSNorm
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02, generator=g)

    inner = model.model
    for mod in (inner.embed_tokens, inner.norm, model.lm_head):
        make(mod)
    inner.rotary_emb = type(inner.rotary_emb)(config=cfg).to("cuda")  # derived buffers
    for block in inner.layers:
        for mod in block.modules():
            make(mod)
        rtn_quantize_(block, bits, group_size, options, inside="")
    torch.cuda.empty_cache()
    return model.eval()


@torch.no_grad()
def rtn_quantize_(model: nn.Module, bits: int, group_size: int, options=None,
                  inside: str = "layers.") -> int:
    """Replace every nn.Linear whose name contains ``inside`` (the decoder blocks; "" for
    all of ``model``) by a packed QuantLinear (RTN), prepared with ``options``."""
    from kvant.config import QuantArgs
    from kvant.core.grid import rtn
    from kvant.formats.packing import pack
    from kvant.model.discovery import set_submodule
    from kvant.nn.qlinear import QuantLinear

    n = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or inside not in name:
            continue
        w = mod.weight
        q, prm = rtn(w.float(), QuantArgs(bits, group_size))
        with torch.device(w.device):  # the shell made there: no move, no repack of zeros
            ql = QuantLinear(w.shape[1], w.shape[0], bits, group_size,
                             bias=mod.bias is not None, dtype=w.dtype)
        ql.qweight.copy_(pack(q, bits))
        ql.scales.copy_(prm.scales.to(torch.float16))
        ql.qzeros.copy_(pack(prm.zeros.round().to(torch.int32), bits))
        if mod.bias is not None:
            ql.bias.copy_(mod.bias)
        ql.prepare(options=options)  # the kernel layout of the copied tensors
        set_submodule(model, name, ql)
        n += 1
    torch.cuda.empty_cache()
    return n


class Decoder(StaticDecoder):
    """kvant's graph-replayable decode step (kvant.serve.StaticDecoder: embed, every block
    with a StaticCache, argmax) started from random tokens at position 0, for timing.
    compile: Inductor fuses the ops between the linear layers (RMSNorm, rotary, cache update,
    residuals, SiLU*up: ~40 launches a block in eager); our kernels stay opaque custom ops.
    The compiled step is then captured in our own CUDA graph like the eager one."""

    def __init__(self, model, batch: int, ctx: int, compile: bool = False,
                 attention: str = "grouped"):
        super().__init__(model, batch, ctx, compile, attention)
        self.tok.copy_(torch.randint(0, model.config.vocab_size, (batch, 1)))

    def capture(self, warmup: int = 3):
        # one eager step first: the StaticCache allocates its layers lazily, which would
        # otherwise break the compiled graph and recompile it once per layer
        self.step()
        self.graph = capture_graph(self._run, warmup)

    def time(self, steps: int) -> float:
        """Seconds per step over ``steps`` replays (positions keep advancing; our position
        and the StaticCache's own write counter advance together, one per step)."""
        self.graph.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            self.graph.replay()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3 / steps

    def profile(self, steps: int, path: Path) -> None:
        """GPU time per kernel over ``steps`` replays (torch.profiler; the graph's kernels
        are recorded one by one), the table sorted by total GPU time, into ``path``."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                self.graph.replay()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40,
                                          max_name_column_width=90)
        path.write_text(f"{steps} replayed steps\n{table}\n")


def tune_for(model, batch: int) -> int:
    """Tune our kernels once for each distinct QuantLinear shape at this batch, timing graph
    replays over copies of the layer's weight (benchmarks/kernel_table.py:tune_graph)."""
    from kvant import prepare_for_inference
    from kvant.kernels.triton.repack import PackedWeight
    from kvant.nn.qlinear import QuantLinear

    prepare_for_inference(model)
    seen = set()
    for m in model.modules():
        lay = m.kernel_layout if isinstance(m, QuantLinear) else None
        if lay is not None:
            key = (m.out_features, m.in_features)
            if key not in seen:
                seen.add(key)
                p = PackedWeight(m.kernel_qweight, m.kernel_scales, m.kernel_zeros,
                                 m.kernel_perm, lay.bits, lay.group_size, lay.in_features,
                                 m.out_features, lay.pairs, lay.tile)
                ps = [p] + [_clone(p) for _ in range(_copies(p.nbytes()) - 1)]
                x = torch.randn(batch, m.in_features, device="cuda", dtype=torch.float16)
                tune_graph(x, ps)
                del ps
    return len(seen)


def measure(model, batches, ctx, steps, label, log, compile: bool = False,
            attention: str = "grouped", profile_dir: Path | None = None) -> dict:
    res = {}
    for b in batches:
        t0 = time.time()
        with Decoder(model, b, ctx, compile, attention) as dec:
            dec.capture()
            if compile:
                log(f"{label} batch {b}: compiled and captured in {time.time() - t0:.1f}s")
            sec = dec.time(steps)
            if profile_dir is not None:
                path = profile_dir / f"profile_{label}_b{b}_{attention}.txt"
                dec.profile(5, path)
                log(f"wrote {path}")
        res[b] = sec
        log(f"{label} batch {b} ({attention} attention): {1e3 * sec:.2f} ms/step, "
            f"{b / sec:.1f} tokens/s")
        del dec
        torch.cuda.empty_cache()
    return res


def weight_bytes(model) -> int:
    """Bytes of every parameter and stored buffer (what one decode step must at least read;
    the kernels' layout of a prepared layer, ``kernel_*``, is the same weights again)."""
    bufs = [t for n, t in model.named_buffers() if not n.rpartition(".")[2].startswith("kernel_")]
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + bufs)


def write(rows: list, args, meta: dict, log) -> None:
    """Write {name}.json and .md now (after every measurement: a cut run keeps its rows)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    how = "torch.compile-d and captured as a CUDA graph" if args.compile else \
        "a replayed CUDA graph"
    lines = [f"# Decode speed on {meta['device']}", "",
             f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}. Model "
             f"`{meta['model']}`; one token per sequence per step, static KV cache of "
             f"{args.ctx}, each step {how}, {args.steps} steps timed. W{args.bits}: kvant RTN "
             f"g{args.group_size} in every block Linear (lm_head fp16), our Triton kernels.",
             "Attention: `grouped` is kvant's (kvant.serve.attention: the cached keys and values "
             "are read once, never repeated per query head), `model` the model's own (SDPA; "
             "under torch.compile with a mask transformers repeats them).",
             "", "| weights | attention | batch | ms/step | tokens/s | speed-up vs fp16 | "
             "weights GB | GPU GiB allocated | GPU GiB peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = "fp16" if r["method"] == "float" else f"W{r['bits']} g{r['group_size']}"
        sp = f"{r['speedup']:.2f}×" if r["speedup"] else "–"
        lines.append(f"| {w} | {r.get('attention', 'model')} | {r['batch']} | "
                     f"{r['ms_per_step']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {sp} | {r['weight_gb']:.2f} | "
                     f"{r.get('gpu_alloc_gib', float('nan')):.1f} | "
                     f"{r.get('gpu_peak_gib', float('nan')):.1f} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out}/{args.name}.{{json,md}}")


def main() -> None:
    from record import git_commit, tree_dirty  # KVANT_COMMIT on copies without .git

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="HF dir or kvant checkpoint (default: random "
                                                "Llama-2-7B shape)")
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES),
                    help="random-weight model shape when --model is not given")
    ap.add_argument("--layers", type=int, default=0, help="override the block count")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="decode", help="output file stem")
    ap.add_argument("--fuse", action="store_true",
                    help="fuse q/k/v and gate/up (kvant.nn.fuse) in both the fp16 and the W4 "
                         "model: one GEMV per shared input")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step (both models) before graph capture")
    ap.add_argument("--no-float", action="store_true",
                    help="skip the fp16 rows: the random model is made and quantized block by "
                         "block (the only way for llama3-70b)")
    ap.add_argument("--stored-on-host", action="store_true",
                    help="KernelOptions.stored_on_host: each weight once on the GPU")
    ap.add_argument("--profile", action="store_true",
                    help="also write the GPU time per kernel of 5 steps for every timed "
                         "batch (profile_<weights>_b<batch>_<attention>.txt in --out)")
    ap.add_argument("--attention", default="grouped",
                    help="comma list of grouped (kvant's) and model (the model's own): every "
                         "batch is timed with each, the model made once")
    args = ap.parse_args()
    attentions = args.attention.split(",")
    if any(a not in ("grouped", "model") for a in attentions):
        ap.error(f"--attention takes grouped and/or model, got {args.attention!r}")
    if args.compile:  # one compiled step per (model, batch): four or more graphs
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    batches = [int(b) for b in args.batches.split(",")]
    prof_dir = Path(args.out) if args.profile else None
    if prof_dir is not None:
        prof_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0)

    def log(msg):
        print(msg, flush=True)

    from kvant.kernels import KernelOptions

    options = KernelOptions(stored_on_host=args.stored_on_host)
    quantized_input = False
    if args.model:
        import kvant

        model, _ = kvant.load_model(args.model, dtype=torch.float16, device="cuda",
                                    kernel_options=options)
        model = model.half().eval()
        quantized_input = hasattr(model, "kvant_quantization_config")
        name = Path(args.model).name
    elif args.no_float:
        t0 = time.time()
        model = random_llama_quantized(args.shape, args.layers, args.bits, args.group_size,
                                       options)
        quantized_input = True
        name = f"{args.shape}-shape-random-{model.config.num_hidden_layers}L-rtn"
        log(f"made and quantized block by block in {time.time() - t0:.1f}s; GPU "
            f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated")
    else:
        model = random_llama(args.shape, args.layers)
        name = f"{args.shape}-shape-random-{model.config.num_hidden_layers}L"
    if args.stored_on_host:
        name += "-host"
    if args.fuse:  # before RTN: the fused float layers are then quantized as one
        from kvant.nn.fuse import find_siblings, fuse_siblings

        probe = torch.zeros(1, 4, dtype=torch.long, device="cuda")
        fused = fuse_siblings(model, find_siblings(model, input_ids=probe))
        log(f"fused {len(fused)} groups of sibling Linears")
        name += "-fused"
    if args.compile:
        name += "-compiled"
    rows = []
    meta = dict(model=name, device=device, date=datetime.date.today().isoformat(),
                commit=git_commit(), dirty=tree_dirty(), ctx=args.ctx, steps=args.steps, torch=torch.__version__,
                fused=args.fuse, compiled=args.compile)
    fp16 = {}
    if not quantized_input:
        gb = weight_bytes(model) / 1e9
        for att in attentions:
            sec_by_b = measure(model, batches, args.ctx, args.steps, "fp16", log,
                               args.compile, att, prof_dir)
            fp16.update({(b, att): sec for b, sec in sec_by_b.items()})
            for b, sec in sec_by_b.items():
                rows.append(dict(meta, method="float", bits=16, group_size=None, batch=b,
                                 attention=att, ms_per_step=1e3 * sec, tokens_per_s=b / sec,
                                 speedup=1.0, weight_gb=gb))
            write(rows, args, meta, log)
        t0 = time.time()
        n = rtn_quantize_(model, args.bits, args.group_size)
        log(f"RTN W{args.bits} g{args.group_size}: {n} layers in {time.time() - t0:.1f}s")
    gb = weight_bytes(model) / 1e9
    for b in batches:
        t0 = time.time()
        shapes = tune_for(model, b)
        log(f"tuned {shapes} shapes for batch {b} in {time.time() - t0:.1f}s")
        for att in attentions:
            sec = measure(model, [b], args.ctx, args.steps, f"W{args.bits}", log,
                          args.compile, att, prof_dir)[b]
            rows.append(dict(meta, method="rtn", bits=args.bits, group_size=args.group_size,
                             batch=b, attention=att, ms_per_step=1e3 * sec,
                             tokens_per_s=b / sec,
                             speedup=(fp16[b, att] / sec) if (b, att) in fp16 else None,
                             weight_gb=gb, gpu_alloc_gib=torch.cuda.memory_allocated() / 2**30,
                             gpu_peak_gib=torch.cuda.max_memory_allocated() / 2**30))
            write(rows, args, meta, log)


if __name__ == "__main__":
    main()
