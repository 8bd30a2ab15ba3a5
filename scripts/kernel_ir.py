#!/usr/bin/env python3
"""Compile one of kvant's Triton kernels for Hopper on a machine without a GPU, and report
what the compiler made of it: registers, spills and shared memory (``ptxas -v``), and the
loads of the main loop in the TTGIR (which Triton pipelined into shared memory with
``cp.async`` and which stay plain, waited-for loads).

GPU time is scarce; this answers "is that load pipelined?", "does this change spill?" before
a device call. It is how the 4-bit kernel's exposed scale loads were found (docs/KERNELS.md,
experiment log). Needs Triton (``pip install triton``; no GPU, no CUDA driver): Triton's
own ``ptxas`` assembles the PTX.

Integer arguments get the 16-divisibility that Triton gives real launches with such sizes,
so the IR matches what runs on the card. Writes ``<out>/<kernel>.{ttgir,ptx}``.

Usage (``--sass``: also the machine code, one instruction a line, to diff two builds)::

    python3 scripts/kernel_ir.py pairs --const GS=128 BN=128 BM=16 TH=16 --sass --stages 4
    python3 scripts/kernel_ir.py gemv --const BITS=3 GS=128 BN=32 CPI=1 --stages 2
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

# per kernel: (module, function, [(argument, Triton type)], runtime ints left unspecialised,
# default constexprs)
_PTRS = [("x_ptr", "*fp16"), ("qw_ptr", "*i32"), ("s_ptr", "*fp16"), ("z_ptr", "*u8"),
         ("perm_ptr", "*i32"), ("out_ptr", "*fp16"), ("part_ptr", "*fp32"), ("cnt_ptr", "*i32")]
# the pairs kernel reads one pointer of group words (repack.group_words) for scales and zeros
_PAIRS_PTRS = [a for a in _PTRS if a[0] not in ("s_ptr", "z_ptr")]
_PAIRS_PTRS.insert(2, ("g_ptr", "*fp16"))
_INTS = [(n, "i32") for n in ("M", "N", "K", "W", "stride_xm", "stride_om",
                              "chunks_per_split", "n_chunks")]
KERNELS = {
    "pairs": ("kvant.kernels.triton.pairs", "wq_dot_pairs_kernel", _PAIRS_PTRS + _INTS,
              {"M", "chunks_per_split", "n_chunks"},
              dict(GS=128, HAS_PERM=0, SPLIT=1, BN=128, BM=16, TH=16)),
    "gemm": ("kvant.kernels.triton.gemm", "wq_dot_kernel", _PTRS + _INTS + [("magic", "i32")],
             {"M", "chunks_per_split", "n_chunks", "magic"},
             dict(BITS=3, GS=128, HAS_PERM=0, SPLIT=1, BN=64, BM=16)),
    "gemv": ("kvant.kernels.triton.gemv", "wq_gemv_kernel", _PTRS + _INTS + [("magic", "i32")],
             {"M", "chunks_per_split", "n_chunks", "magic"},
             dict(BITS=3, GS=128, HAS_PERM=0, SPLIT=1, BN=32, CPI=1)),
}


def compile_kernel(name: str, const: dict, warps: int, stages: int, arch: int = 90):
    """Triton's compiled kernel (``.asm`` holds 'ttgir' and 'ptx') for ``name``."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, fn_name, args, unspecialised, defaults = KERNELS[name]
    fn = getattr(importlib.import_module(module), fn_name)
    consts = {**defaults, **const}
    for k in ("HAS_PERM", "SPLIT"):
        if k in consts:
            consts[k] = bool(consts[k])
    signature = {a: t for a, t in args}
    signature.update({k: "constexpr" for k in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (a, _) in enumerate(args)
             if a not in unspecialised}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def ptxas_report(ptx: Path, arch: int = 90) -> str:
    """``ptxas -v`` summary (registers, spills, shared memory) of a PTX file."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # Triton >= 3.9 assembles with "ptxas-blackwell" (the older ptxas rejects its PTX version)
    ptxas = next((bin_dir / n for n in ("ptxas-blackwell", "ptxas")
                  if (bin_dir / n).exists()), bin_dir / "ptxas")
    res = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(ptx), "-o", "/dev/null"],
                         capture_output=True, text=True)
    lines = [ln.strip() for ln in (res.stdout + res.stderr).splitlines()
             if "Used" in ln or "spill" in ln]
    return "\n".join(lines) or (res.stdout + res.stderr).strip()


def main_loop(ttgir: str) -> list[str]:
    """The lines of the first ``scf.for`` of a TTGIR, nested regions included ([] if none)."""
    lines = ttgir.splitlines()
    start = next((i for i, ln in enumerate(lines) if "scf.for" in ln), None)
    if start is None:
        return []
    depth, body = 0, []
    for ln in lines[start:]:
        body.append(ln)
        depth += ln.count("{") - ln.count("}")
        if depth <= 0:
            break
    return body


def loop_loads(ttgir: str) -> list[str]:
    """One line per load inside the main loop: 'cp.async' (pipelined into shared memory) or
    'plain' (a register load: waited for in the same iteration, unless its value is only
    used in the next one, as the prefetched scales are), with its SSA name."""
    out = []
    for ln in main_loop(ttgir):
        if "async_copy_global_to_local" in ln or re.search(r"= tt\.load ", ln):
            kind = "cp.async" if "async_copy" in ln else "plain"
            var = re.match(r"\s*(%[\w.#:]+)", ln)
            out.append(f"{kind:8s} {var.group(1) if var else '?'}")
    return out


def loop_mma(ttgir: str) -> dict:
    """In the main loop: tensor-core dots issued (``warp_group_dot`` / ``tt.dot``) and waits
    on them, with how many wait for every dot in flight (``pendings = 0``)."""
    counts = {"dots": 0, "waits": 0, "full_waits": 0}
    for ln in main_loop(ttgir):
        if "warp_group_dot_wait" in ln:
            counts["waits"] += 1
            counts["full_waits"] += "pendings = 0" in ln
        elif "warp_group_dot " in ln or "= tt.dot " in ln:
            counts["dots"] += 1
    return counts


def sass(cubin: bytes, folder: Path, name: str) -> Path:
    """Disassemble ``cubin`` with Triton's nvdisasm into ``folder/name.sass``, one instruction
    a line without addresses or encodings, so two builds can be diffed: identical SASS means
    a source change (a refactor) did not change the machine code."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    cub = folder / f"{name}.cubin"
    cub.write_bytes(cubin)
    text = subprocess.run([str(nvdisasm), "-c", str(cub)], capture_output=True,
                          text=True).stdout
    lines = [ln.split("*/", 1)[-1].strip() if "*/" in ln else ln.strip()
             for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("//", "."))]
    out = folder / f"{name}.sass"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=sorted(KERNELS))
    ap.add_argument("--const", nargs="*", default=[], help="NAME=INT constexprs")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--out", default="/tmp/kvant-ir")
    ap.add_argument("--sass", action="store_true",
                    help="also write <kernel>.sass (nvdisasm, diffable between builds)")
    args = ap.parse_args(argv)
    const = {}
    for item in args.const:
        key, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            ap.error(f"--const takes NAME=INT, got {item!r}")
        const[key] = int(value)
    try:
        compiled = compile_kernel(args.kernel, const, args.warps, args.stages)
    except ImportError as e:
        print(f"needs Triton (pip install triton): {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.kernel}.ttgir").write_text(compiled.asm["ttgir"])
    (out / f"{args.kernel}.ptx").write_text(compiled.asm["ptx"])
    print(f"{args.kernel}: shared memory {compiled.metadata.shared} bytes")
    print(ptxas_report(out / f"{args.kernel}.ptx"))
    print("loads in the main loop:")
    for line in loop_loads(compiled.asm["ttgir"]):
        print("  " + line)
    mma = loop_mma(compiled.asm["ttgir"])
    print(f"tensor-core dots in the main loop: {mma['dots']}, waits {mma['waits']} "
          f"({mma['full_waits']} waiting for every dot in flight)")
    if args.sass:
        print(f"wrote {sass(compiled.asm['cubin'], out, args.kernel)}")
    print(f"wrote {out}/{args.kernel}.{{ttgir,ptx}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
