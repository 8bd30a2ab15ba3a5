"""CUDA-core form of the E8P kernel (kernels/triton/e8p.py): one row of x a program, the
decode in as few instructions a weight as we could get Triton to emit (offline sm_90 SASS,
benchmarks/e8p_sass_count.py).

Each thread owns R = BN / (32·warps) rows and one pair of adjacent codes a row per
iteration (the codes read as int32 pairs, x as int64 pairs of fp16x2 words: host views, the
stored format is unchanged), so the x words and their quarter-sums are loaded once for R
rows. Per code ``c`` (E8P, sign-extended int32):

- the absolute row: two 64-bit gathers of the word table (4 fp16x2 / bf16x2 words);
- the signs computed: sign bits 2j, 2j+1 go to bits 15 and 31 of word j by one multiply of
  ``c & 0x7F00`` (the copies never overlap, so no carry); entry 7's sign is the parity of
  the 7 bits (popc) on top of the table's parity of Σa; one LOP3 ``a ^ (m & 0x80008000)``
  a word;
- the products in packed half precision: 4 ``fma.{f16x2,bf16x2}`` into a chain that starts
  from the shift term ``±¼ (Σ even x, Σ odd x)`` (the shift bit is the code's sign bit, so
  ``xq ^ (c & 0x80008000)`` is that term in one LOP3); one chain spans the pair of codes
  (16 products, 8 a half), then its two halves are added and converted to fp32 once.

The E8P1 stage (3 bits) is the same with the constant absolute word ½ (its 7 sign bits in
bits 0-6, the shift in bit 7). On the GPU the packed FMA and popc are inline PTX; Triton's
interpreter (no inline assembly) takes the same arithmetic in Triton ops (the FMA in fp32
rounded to the half type once, which matches ``fma.rn`` but for rare double roundings).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvant.kernels.codebook import e8p1_words
from kvant.kernels.triton.e8p_configs import Config, auto_split
from kvant.kernels.triton.planes import split_k_buffers, store_or_reduce

_MASK_HI = tl.constexpr(-2147450880)  # 0x80008000: the sign bits of both halves


@triton.jit
def _halves(a, DT: tl.constexpr):
    return (a.to(tl.int16).to(DT, bitcast=True).to(tl.float32),
            (a >> 16).to(tl.int16).to(DT, bitcast=True).to(tl.float32))


@triton.jit
def _bf16_bits(v):
    """fp32 -> its bf16 bit pattern (round to nearest even) in the low 16 bits."""
    b = v.to(tl.int32, bitcast=True)
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@triton.jit
def _pack(lo, hi, DT: tl.constexpr):
    """Two fp32 tensors -> one int32 word of their DT values (lo in the low half), rounded
    to nearest even. bf16 by its fp32 bits: the interpreter's fp32 -> bf16 truncates."""
    if DT == tl.bfloat16:
        lo16 = _bf16_bits(lo)
        hi16 = _bf16_bits(hi)
    else:
        lo16 = lo.to(DT).to(tl.int16, bitcast=True).to(tl.int32)
        hi16 = hi.to(DT).to(tl.int16, bitcast=True).to(tl.int32)
    return (lo16 & 0xFFFF) | (hi16 << 16)


@triton.jit
def _fma2(a, b, c, ASM: tl.constexpr, DT: tl.constexpr):
    """a * b + c on two packed DT values a word (int32 words in and out)."""
    if ASM:
        if DT == tl.bfloat16:
            return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                             [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                         [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
    alo, ahi = _halves(a, DT)
    blo, bhi = _halves(b, DT)
    clo, chi = _halves(c, DT)
    return _pack(alo * blo + clo, ahi * bhi + chi, DT)


@triton.jit
def _parity31(v, ASM: tl.constexpr):
    """The parity of v's bits (v < 2^15) at bit 31."""
    if ASM:
        p = tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [v], dtype=tl.int32,
                                      is_pure=True, pack=1)
        return p << 31
    p = v ^ (v >> 8)
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return p << 31


@triton.jit
def _signed_words(a0, a1, a2, a3, cs, SB: tl.constexpr, ASM: tl.constexpr):
    """The 4 words with the signs of ``cs`` (the 7 sign bits at bits SB..SB+6, all else 0)
    applied: bit SB+2j -> 15 and SB+2j+1 -> 31 of word j by one multiply, entry 7's sign
    the parity of the 7 bits (the table's parity of Σa already in a3)."""
    w0 = a0 ^ ((cs * ((1 << (15 - SB)) + (1 << (30 - SB)))) & _MASK_HI)
    w1 = a1 ^ ((cs * ((1 << (13 - SB)) + (1 << (28 - SB)))) & _MASK_HI)
    w2 = a2 ^ ((cs * ((1 << (11 - SB)) + (1 << (26 - SB)))) & _MASK_HI)
    w3 = a3 ^ ((cs * (1 << (9 - SB)) + _parity31(cs, ASM)) & _MASK_HI)
    return w0, w1, w2, w3


@triton.jit
def _e8p_code(c, p, abs_ptr, x0, x1, x2, x3, ASM: tl.constexpr, DT: tl.constexpr):
    """p + the products of one E8P code ``c`` (sign-extended int32) with x words x0..x3."""
    ap = abs_ptr + (c & 255) * 2  # (257, 2) int64 rows
    a01 = tl.load(ap)
    a23 = tl.load(ap + 1)
    w0, w1, w2, w3 = _signed_words(a01.to(tl.int32), (a01 >> 32).to(tl.int32),
                                   a23.to(tl.int32), (a23 >> 32).to(tl.int32),
                                   c & 0x7F00, 8, ASM)
    p = _fma2(w0, x0, p, ASM, DT)
    p = _fma2(w1, x1, p, ASM, DT)
    p = _fma2(w2, x2, p, ASM, DT)
    return _fma2(w3, x3, p, ASM, DT)


@triton.jit
def _e8p1_code(c, p, half, r1_ptr, x0, x1, x2, x3, R1: tl.constexpr, ASM: tl.constexpr,
               DT: tl.constexpr):
    """p + the products of one E8P1 code ``c`` (0..255). R1 2: its 8 values, shift
    included (±¼, ±¾: exact), from the (256, 2) int64 table ``r1_ptr``; R1 1: the signs
    computed and applied to x (its absolute values are all ½: ``half`` the word of two ½),
    without the shift."""
    if R1 == 2:
        rp = r1_ptr + c * 2
        w01 = tl.load(rp)
        w23 = tl.load(rp + 1)
        p = _fma2(w01.to(tl.int32), x0, p, ASM, DT)
        p = _fma2((w01 >> 32).to(tl.int32), x1, p, ASM, DT)
        p = _fma2(w23.to(tl.int32), x2, p, ASM, DT)
        return _fma2((w23 >> 32).to(tl.int32), x3, p, ASM, DT)
    y0, y1, y2, y3 = _signed_words(x0, x1, x2, x3, c & 0x7F, 0, ASM)  # σ x, then · ½
    p = _fma2(y0, half, p, ASM, DT)
    p = _fma2(y1, half, p, ASM, DT)
    p = _fma2(y2, half, p, ASM, DT)
    return _fma2(y3, half, p, ASM, DT)


@triton.jit
def _flush(p, ASM: tl.constexpr, DT: tl.constexpr):
    """fp32 sum of the two halves of p, added in DT first (one conversion; the interpreter's
    bf16 addition is wrong, so there in fp32 and rounded to DT)."""
    if ASM:
        lo = p.to(tl.int16).to(DT, bitcast=True)
        hi = (p >> 16).to(tl.int16).to(DT, bitcast=True)
        return (lo + hi).to(tl.float32)
    lo, hi = _halves(p, DT)
    if DT == tl.bfloat16:
        return (_bf16_bits(lo + hi) << 16).to(tl.float32, bitcast=True)
    return (lo + hi).to(DT).to(tl.float32)


@triton.jit
def _shift_term(c, xq, zero, KIND: tl.constexpr):
    """±xq by the code's shift bit: E8P's (KIND 0) is its sign bit (bits 15 and 31 of the
    sign-extended code); E8P1's bit 7 goes to both by one multiply (c < 256: no overlap);
    none where the table words carry the shift (KIND 2)."""
    if KIND == 0:
        return xq ^ (c & _MASK_HI)
    if KIND == 1:
        return xq ^ ((c * 0x01000100) & _MASK_HI)
    return zero


@triton.jit
def _code(c, p, KIND: tl.constexpr, abs_ptr, r1_ptr, half, x0, x1, x2, x3,
          ASM: tl.constexpr, DT: tl.constexpr):
    if KIND == 0:
        return _e8p_code(c, p, abs_ptr, x0, x1, x2, x3, ASM, DT)
    return _e8p1_code(c, p, half, r1_ptr, x0, x1, x2, x3, KIND, ASM, DT)


@triton.jit
def _pair(c0, c1, KIND: tl.constexpr, abs_ptr, r1_ptr, half, one, zero, xq0, xq1, x0, x1,
          x2, x3, x4, x5, x6, x7, ASM: tl.constexpr, DT: tl.constexpr):
    """fp32 products of two adjacent codes (blocks 2b, 2b+1) with their x words; KIND 0:
    E8P, 1: E8P1 with computed signs, 2: E8P1 from its full table. One packed chain for both
    codes in fp16 (16 products, 8 a half), one each in bf16 (8 bits of mantissa: a chain of
    16 measured 5e-3 relative error in the interpreter, against 1e-2 allowed)."""
    p = _code(c0, _shift_term(c0, xq0, zero, KIND), KIND, abs_ptr, r1_ptr, half,
              x0, x1, x2, x3, ASM, DT)
    if DT == tl.bfloat16:
        out = _flush(p, ASM, DT)
        p = _shift_term(c1, xq1, zero, KIND)
    elif KIND != 2:
        p = _fma2(_shift_term(c1, xq1, zero, KIND), one, p, ASM, DT)
    p = _code(c1, p, KIND, abs_ptr, r1_ptr, half, x4, x5, x6, x7, ASM, DT)
    if DT == tl.bfloat16:
        return out + _flush(p, ASM, DT)
    return _flush(p, ASM, DT)


@triton.jit(do_not_specialize=["per"])
def e8p_gemv_kernel(x_ptr, q1_ptr, q2_ptr, s_ptr, abs_ptr, r1_ptr, out_ptr, part_ptr,
                    cnt_ptr, N, KP, stride_xm, stride_om, stride_ss, stride_sn, per,
                    RESID: tl.constexpr, R1_TABLE: tl.constexpr, SPLIT: tl.constexpr,
                    ASM: tl.constexpr, BF16: tl.constexpr, BN: tl.constexpr):
    """out (M, N) = x (M, 16·KP) @ Ŵᵀ. Grid (M, N tiles, K splits); x as int64 (4 values a
    load), q1 int32 (a pair of E8P codes), q2 int32 (RESID 2: E8P pairs) or int16 (RESID 1:
    E8P1 pairs), abs_ptr the (257, 2) int64 absolute table of x's dtype, r1_ptr the (256, 2)
    int64 E8P1 value table in it (codebook.e8p1_words; read only with R1_TABLE). Split k
    walks pairs ``k·per .. min(KP, (k+1)·per)``, one a loop iteration."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(offs_n, N - 1)  # clamped: unmasked rows, tail rows discarded
    zero = tl.zeros((BN,), tl.int32)
    # two ¼, two ½ and two 1 in DT, as words
    quarter = zero + (0x3E803E80 if BF16 else 0x34003400)
    half = zero + (0x3F003F00 if BF16 else 0x38003800)
    one = zero + (0x3F803F80 if BF16 else 0x3C003C00)
    acc1 = tl.zeros((BN,), tl.float32)
    acc2 = tl.zeros((BN,), tl.float32)
    xp = x_ptr + pid_m.to(tl.int64) * stride_xm
    q1p = q1_ptr + rows.to(tl.int64) * KP
    q2p = q2_ptr + rows.to(tl.int64) * KP
    p_lo = pid_k * per
    for b in range(p_lo, tl.minimum(p_lo + per, KP)):
        cc = tl.load(q1p + b)  # (BN,) two codes: block 2b low, 2b+1 high
        if RESID > 0:
            cc2 = tl.load(q2p + b).to(tl.int32)
        # x words of the two blocks (the same address across the thread's rows: one load)
        xa = tl.load(xp + 4 * b + zero)
        xb = tl.load(xp + 4 * b + 1 + zero)
        xc = tl.load(xp + 4 * b + 2 + zero)
        xd = tl.load(xp + 4 * b + 3 + zero)
        x0, x1 = xa.to(tl.int32), (xa >> 32).to(tl.int32)
        x2, x3 = xb.to(tl.int32), (xb >> 32).to(tl.int32)
        x4, x5 = xc.to(tl.int32), (xc >> 32).to(tl.int32)
        x6, x7 = xd.to(tl.int32), (xd >> 32).to(tl.int32)
        # ¼ (Σ even x, Σ odd x) of each block: the shift term, its sign set per code
        xq0 = _fma2(x0, quarter, _fma2(x1, quarter, _fma2(x2, quarter, _fma2(
            x3, quarter, zero, ASM, DT), ASM, DT), ASM, DT), ASM, DT)
        xq1 = _fma2(x4, quarter, _fma2(x5, quarter, _fma2(x6, quarter, _fma2(
            x7, quarter, zero, ASM, DT), ASM, DT), ASM, DT), ASM, DT)
        acc1 += _pair((cc << 16) >> 16, cc >> 16, 0, abs_ptr, r1_ptr, half, one, zero,
                      xq0, xq1, x0, x1, x2, x3, x4, x5, x6, x7, ASM, DT)
        if RESID == 2:
            acc2 += _pair((cc2 << 16) >> 16, cc2 >> 16, 0, abs_ptr, r1_ptr, half, one, zero,
                          xq0, xq1, x0, x1, x2, x3, x4, x5, x6, x7, ASM, DT)
        elif RESID == 1:  # E8P1 pairs as int16 (sign-extended): bytes 2b and 2b+1
            acc2 += _pair(cc2 & 255, (cc2 >> 8) & 255, 2 if R1_TABLE else 1, abs_ptr, r1_ptr,
                          half, one, zero, xq0, xq1, x0, x1, x2, x3, x4, x5, x6, x7, ASM, DT)
    y = tl.load(s_ptr + rows * stride_sn).to(tl.float32) * acc1
    if RESID > 0:
        y += tl.load(s_ptr + stride_ss + rows * stride_sn).to(tl.float32) * acc2
    mask = offs_n < N
    out_ptrs = out_ptr + pid_m * stride_om + offs_n
    part_offs = pid_m * N + offs_n
    tile = pid_n * tl.num_programs(0) + pid_m
    store_or_reduce(y, out_ptrs, part_ptr, part_offs, mask, cnt_ptr, tile, pid_k,
                    tl.num_programs(2), tl.num_programs(0) * N, SPLIT)


_R1_WORDS: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> E8P1 value table


def resid_words(tables: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The E8P1 value table (codebook.e8p1_words) of ``dtype`` on ``tables``' device, made on
    first use outside graph capture (None during a capture that finds none: the kernel
    then computes the E8P1 signs)."""
    dev = tables.device
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (dev.type, torch.cuda.current_device() if dev.type == "cuda" and dev.index is None
           else dev.index, dtype)
    words = _R1_WORDS.get(key)
    if words is None and not capturing:
        words = _R1_WORDS[key] = e8p1_words(tables, dtype)
    return words


def paired(x2: torch.Tensor, qweight: torch.Tensor, qweight_resid) -> bool:
    """Whether the paired CUDA-core kernel takes this call: an even number of codes a row,
    x rows on 8-byte boundaries (its int64 view), contiguous codes whose pairs start on
    their own boundary (the int32 / int16 views)."""
    q2_ok = qweight_resid is None or (qweight_resid.is_contiguous()
                                      and qweight_resid.data_ptr() % 4 == 0)
    return (qweight.shape[1] % 2 == 0 and x2.stride(0) % 4 == 0
            and x2.data_ptr() % 8 == 0 and qweight.is_contiguous()
            and qweight.data_ptr() % 4 == 0 and q2_ok)


def gemv_split(m: int, n: int, kb: int, cfg: Config, sms: int) -> int:
    """The K splits the paired CUDA-core kernel takes for ``cfg.split`` 0: up to 64 (its
    large row tiles leave few programs along N), at least 4 code pairs each."""
    return auto_split(m * -(-n // cfg.bn), kb // 2, sms, most=64)


def launch(x2, qweight, qweight_resid, scales, tables, absw, bits, cfg, out, counters):
    """out (M, N) = x2 @ Ŵᵀ through :func:`e8p_gemv_kernel` (e8p.launch with a CUDA-core
    ``cfg`` and :func:`paired` inputs): BN rows a program, split-K by cfg.split or the SM
    count; x, codes and the tables passed as views of their packed words; ``counters`` the
    split-K tile counters of a device (e8p.counters)."""
    m = x2.shape[0]
    n, kb = qweight.shape
    kp = kb // 2  # code pairs a row
    grid_n = -(-n // cfg.bn)
    split = cfg.split or gemv_split(m, n, kb, cfg, torch.cuda.get_device_properties(
        x2.device).multi_processor_count if x2.is_cuda else 1)
    per = -(-kp // max(1, min(split, kp)))
    split = -(-kp // per)
    split, per, cnt, part = split_k_buffers(split, per, kp, m * grid_n, out,
                                            lambda: counters(x2.device))
    q2 = qweight_resid
    if q2 is not None:
        q2 = q2.view(torch.int16 if q2.dtype == torch.uint8 else torch.int32)
    r1 = resid_words(tables, x2.dtype) if bits == 3 else None
    e8p_gemv_kernel[(m, grid_n, split)](
        x2.view(torch.int64), qweight.view(torch.int32), q2 if q2 is not None else qweight,
        scales, absw.view(torch.int64), (r1 if r1 is not None else absw).view(torch.int64),
        out, part, cnt if cnt is not None else qweight,
        n, kp, x2.stride(0) // 4, out.stride(0), scales.stride(0),
        scales.stride(1) if scales.shape[1] > 1 else 0, per,
        RESID={2: 0, 3: 1, 4: 2}[bits], R1_TABLE=r1 is not None, SPLIT=split > 1,
        ASM=x2.is_cuda,
        BF16=x2.dtype == torch.bfloat16, BN=cfg.bn, num_warps=cfg.warps,
        num_stages=cfg.stages)
    return out
