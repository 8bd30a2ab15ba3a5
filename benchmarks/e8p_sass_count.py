#!/usr/bin/env python3
"""Machine instructions per weight of the E8P kernel's main loop (kernels/triton/e8p.py),
compiled offline for sm_90 (no GPU): the proxy for its decode cost at batch 1-16.

For each width (2/3/4 bits) and batch (1/4/16) the default launch (``e8p.heuristic``) on an
8192² layer is compiled as a launch would specialise it (the split-K and EVEN flags that
``e8p.launch`` picks on a 132-SM H200, 16-divisible sizes, the row-scale stride 1 as a
constant), Triton's ptxas assembles it for sm_90a and its nvdisasm lists the SASS. The main
loop is the longest backward branch's body; per weight = its instructions x the program's
threads / the weights (BN x 8·BKB) one iteration decodes, i.e. instructions every thread
issues per weight, as on the card when the loop dominates (8192² at batch 1: 64 iterations
of BKB 16 a split). Also the loop's loads, fp16x2 FMAs, fp32 FMAs/adds and the registers.

Usage: ``PYTHONPATH=src python3 benchmarks/e8p_sass_count.py [--bits 2 3 4] [--batch 1 4 16]
[--json FILE]``; run it from a git worktree of another commit to compare.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

N = K = 8192
SMS = 132  # H200


def _bin(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_default(bits: int, m: int, cfg=None):
    """(compiled kernel, config, weights one loop iteration decodes) for the default launch
    of ``m`` rows at ``bits`` on the N x K layer (or the launch ``cfg``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvant.kernels.triton import e8p

    cfg = cfg or e8p.heuristic(m, bits)
    # a Config without ``paired`` (a worktree before 7372ba7) ran the paired kernel at dot 0
    if cfg.dot == 0 and getattr(cfg, "paired", hasattr(e8p, "e8p_gemv_kernel")):
        return _compile_gemv(e8p, cfg, bits, m)
    kb = K // 8
    bm = 16 if cfg.dot else 1
    iters = -(-kb // cfg.bkb)
    split = cfg.split or e8p.auto_split(-(-m // bm) * -(-N // cfg.bn), iters, SMS)
    per = -(-iters // max(1, min(split, iters)))
    split = -(-iters // per)
    q2 = {2: "*i16", 3: "*u8", 4: "*i16"}[bits]
    tab = "*i16" if cfg.unpack == 2 else "*i32"
    ptrs = [("x_ptr", "*fp16"), ("q1_ptr", "*i16"), ("q2_ptr", q2), ("s_ptr", "*fp16"),
            ("absw_ptr", tab), ("sgn_ptr", tab), ("out_ptr", "*fp16"), ("part_ptr", "*fp32"),
            ("cnt_ptr", "*i32")]
    ints = ["M", "N", "KB", "stride_xm", "stride_om", "stride_ss", "iters"]
    sig = dict(ptrs + [(n, "i32") for n in ints])
    sig["stride_sn"] = "constexpr"  # 1 (row scales): Triton makes an int equal to 1 constant
    params = list(e8p.e8p_kernel.arg_names)
    consts = dict(stride_sn=1, RESID={2: 0, 3: 1, 4: 2}[bits], DOT=cfg.dot,
                  SIGN_TABLE=cfg.sign_table, UNPACK=cfg.unpack, SPLIT=split > 1,
                  EVEN=kb % cfg.bkb == 0 and iters % per == 0, BM=bm, BN=cfg.bn, BKB=cfg.bkb)
    for extra in params:  # constexprs a later kernel adds keep their declared defaults
        if extra not in sig and extra not in consts:
            consts[extra] = e8p.e8p_kernel.params[params.index(extra)].default
    sig.update({k: "constexpr" for k in consts})
    sig = {p: sig[p] for p in params}
    div16 = {"x_ptr", "q1_ptr", "q2_ptr", "s_ptr", "absw_ptr", "sgn_ptr", "out_ptr",
             "part_ptr", "cnt_ptr", "N", "KB", "stride_xm", "stride_om", "stride_ss"}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in div16}
    src = ASTSource(fn=e8p.e8p_kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 64),
                              options=dict(num_warps=cfg.warps, num_stages=cfg.stages))
    return compiled, cfg, cfg.bn * cfg.bkb * 8


def _compile_gemv(e8p, cfg, bits: int, m: int):
    """The paired CUDA-core kernel (e8p_gemv.py) as ``e8p._launch_gemv`` launches it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = e8p.e8p_gemv_kernel
    kp = K // 16
    split = e8p.gemv_split(m, N, K // 8, cfg, SMS)
    q2 = {2: "*i32", 3: "*i16", 4: "*i32"}[bits]
    sig = dict(x_ptr="*i64", q1_ptr="*i32", q2_ptr=q2, s_ptr="*fp16", abs_ptr="*i64",
               r1_ptr="*i64", out_ptr="*fp16", part_ptr="*fp32", cnt_ptr="*i32", N="i32", KP="i32",
               stride_xm="i32", stride_om="i32", stride_ss="i32", per="i32")
    consts = dict(stride_sn=1, RESID={2: 0, 3: 1, 4: 2}[bits], R1_TABLE=True,
                  SPLIT=split > 1, ASM=True, BF16=False, BN=cfg.bn)
    params = list(fn.arg_names)
    sig = {p: sig.get(p, "constexpr") for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in sig
             if sig[p] != "constexpr" and p != "per"}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 64),
                              options=dict(num_warps=cfg.warps, num_stages=cfg.stages))
    return compiled, cfg, cfg.bn * 16  # one pair of codes a row an iteration


def sass_lines(cubin: bytes) -> list[str]:
    """The SASS of ``cubin``, one instruction or label a line (no addresses, encodings)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_bin("nvdisasm"), "-c", str(path)], capture_output=True,
                              text=True, check=True).stdout
    out = []
    for ln in text.splitlines():
        ln = ln.split("*/", 1)[-1].strip() if ln.strip().startswith("/*") else ln.strip()
        if ln.startswith(".L") and ln.endswith(":"):
            out.append(ln)
        elif ln and not ln.startswith(("//", ".", "/*")):
            out.append(ln.rstrip(" ;"))
    return out


def main_loop(lines: list[str]) -> list[str]:
    """Instructions of the longest loop: from a label to the last branch back to it."""
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if ln.endswith(":")}
    best: list[str] = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L\w+)", ln)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)] + 1:i + 1] if not x.endswith(":")]
            best = max(best, body, key=len)
    return best


def registers(ptx: str) -> str:
    """ptxas -v's register / spill line for the PTX."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([_bin("ptxas"), "-arch=sm_90a", "-v", str(path), "-o",
                              "/dev/null"], capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return f"{regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B spill"


def opcode(ins: str) -> str:
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    return ins.split()[0] if ins else ""


def count(bits: int, m: int, cfg=None) -> dict:
    """The main loop's counts for the default launch (module docstring), or for ``cfg``."""
    compiled, cfg, weights = compile_default(bits, m, cfg)
    body = main_loop(sass_lines(compiled.asm["cubin"]))
    ops = [opcode(x) for x in body]
    threads = 32 * cfg.warps
    return dict(bits=bits, batch=m, config=(f"dot {cfg.dot} bn {cfg.bn} bkb {cfg.bkb} "
                                            f"unpack {cfg.unpack} "
                                            f"{'table' if cfg.sign_table else 'computed'} "
                                            f"w{cfg.warps} s{cfg.stages}"
                                            f"{' paired' if cfg.paired else ''}"),
                loop=len(body), per_weight=round(len(body) * threads / weights, 3),
                loads=sum(o.startswith(("LDG", "LDS", "LD.")) for o in ops),
                hfma2=sum(o.startswith(("HFMA2", "HMUL2", "HADD2")) and ".F32" not in o
                          for o in ops),
                ffma=sum(o.startswith(("FFMA", "FADD", "FMUL")) for o in ops),
                hmma=sum(o.startswith(("HMMA", "HGMMA")) for o in ops),
                regs=registers(compiled.asm["ptx"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    print("| bits | batch | config | loop SASS | per weight | loads | fp16x2 | fp32 | mma "
          "| registers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bits in args.bits:
        for m in args.batch:
            r = count(bits, m)
            rows.append(r)
            print(f"| {bits} | {m} | {r['config']} | {r['loop']} | {r['per_weight']} | "
                  f"{r['loads']} | {r['hfma2']} | {r['ffma']} | {r['hmma']} | {r['regs']} |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
