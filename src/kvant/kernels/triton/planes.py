"""Triton device helpers shared by the kernels: unpack one plane, and the split-K epilogue.

A *plane* is value slot ``J`` of every word of a (rows, 32) tile in the repacked layout
(repack.py): the weights of 32 consecutive input columns. It is turned into ``q - z`` in fp32
without an integer-to-float conversion instruction (those issue at 1/8 of the FMA rate on
Hopper): the bits are or-ed into the mantissa of 2**23, ``0x4B000000 | (q << SH)`` is the
float ``2**23 + q * 2**SH``, and one FFMA ``f * 2**-SH - (2**(23-SH) + z)`` gives ``q - z``
exactly. Keeping ``q`` at its bit position ``SH`` (instead of shifting it down) saves the
shift; slots above bit 16 come from the word shifted once by 16, so the mantissa never
overflows.
"""

import torch
import triton
import triton.language as tl


COUNTER_SLOTS = 1 << 16  # split-K tile counters per device and kernel module


def device_counters(registry: dict, device: torch.device) -> torch.Tensor | None:
    """The split-K tile counters of ``device`` in ``registry`` (each kernel module keeps its
    own, keyed by (type, index)): zeros, made on first use outside a CUDA-graph capture (every
    launch leaves them at zero); None during a capture that finds none."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    cnt = registry.get(key)
    if cnt is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        cnt = registry[key] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return cnt


def split_k_buffers(split: int, per: int, total: int, tiles: int, out: torch.Tensor,
                    counters) -> tuple:
    """Host side of the split-K epilogue (:func:`store_or_reduce`): ``(split, per, cnt,
    part)`` for a launch of ``tiles`` output tiles whose K loop of ``total`` iterations is
    cut into ``split`` parts of ``per``. ``cnt``: the device's tile counters (``counters()``;
    None while a graph is captured before they exist); ``part``: the fp32 partial sums
    (split, *out.shape). Where there are no counters, or too few for the tiles, one split
    writes ``out`` directly."""
    cnt = counters() if split > 1 else None
    if split > 1 and (cnt is None or tiles > cnt.numel()):
        split, per = 1, total
    part = (torch.empty((split, *out.shape), dtype=torch.float32, device=out.device)
            if split > 1 else out)
    return split, per, cnt, part


@triton.jit
def plane_qz(w, w_hi, zneg, magic, J: tl.constexpr, BITS: tl.constexpr):
    """(q - z) fp32 (R, 32) of slot J of words ``w`` (R, 32) int32; ``w_hi = w >> 16``,
    ``zneg`` fp32 = -zero point of each row, shaped to broadcast (e.g. (R, 1)), ``magic`` =
    0x4B000000 passed at run time
    (in a register, ptxas fuses mask-and-or into one LOP3)."""
    SH: tl.constexpr = (J * BITS) % 16  # bit position in w (slots < 16) or in w_hi
    MASK: tl.constexpr = ((1 << BITS) - 1) << SH
    INV: tl.constexpr = 1.0 / (1 << SH)
    OFF: tl.constexpr = 1 << (23 - SH)
    if J * BITS < 16:
        f = ((w & MASK) | magic).to(tl.float32, bitcast=True)
    else:
        f = ((w_hi & MASK) | magic).to(tl.float32, bitcast=True)
    return f * INV + (zneg - OFF)


@triton.jit
def plane3_qz(lo, lo_hi, hw, zneg, magic, P: tl.constexpr):
    """(q - z) fp32 of plane P (0..31) of a 3-bit chunk: ``lo`` the 2-bit words of this half
    (planes P // 16), ``lo_hi = lo >> 16``, ``hw`` the 1-bit words (high bit of plane P at
    bit P)."""
    J: tl.constexpr = P % 16
    SH: tl.constexpr = (2 * J) % 16
    MLO: tl.constexpr = 3 << SH
    MHI: tl.constexpr = 4 << SH
    INV: tl.constexpr = 1.0 / (1 << SH)
    OFF: tl.constexpr = 1 << (23 - SH)
    if 2 * J < 16:
        src = lo
    else:
        src = lo_hi
    # move the high bit from position P to SH + 2
    if P >= SH + 2:
        hb = hw >> (P - SH - 2)
    else:
        hb = hw << (SH + 2 - P)
    f = ((src & MLO) | (hb & MHI) | magic).to(tl.float32, bitcast=True)
    return f * INV + (zneg - OFF)


@triton.jit
def x_tile(x_ptrs, perm_ptr, kk, K, m_ok, HAS_PERM: tl.constexpr):
    """The (len(kk), BM) tile of x for input columns ``kk`` of the repacked order (through
    ``perm`` for act-order), zero past K and on rows of x past M; ``x_ptrs`` (1, BM)."""
    k_ok = kk < K
    if HAS_PERM:
        kx = tl.load(perm_ptr + kk, mask=k_ok, other=0)
    else:
        kx = kk
    return tl.load(x_ptrs + kx[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)


@triton.jit
def store_or_reduce(acc, out_ptrs, part_ptr, part_offs, mask, cnt_ptr, tile, pid_k, n_split,
                    part_stride, SPLIT: tl.constexpr):
    """Write the fp32 tile ``acc`` to ``out_ptrs`` (cast to their dtype), or with split-K:
    write it to the workspace ``part_ptr`` and let the last of the ``n_split`` programs of
    this tile (found with an acq_rel counter, reset to 0 afterwards) sum and write the tile.
    """
    if SPLIT:
        tl.store(part_ptr + pid_k * part_stride + part_offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        old = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if old == n_split - 1:
            tot = tl.zeros_like(acc)
            for s in range(0, n_split):
                tot += tl.load(part_ptr + s * part_stride + part_offs, mask=mask, other=0.0,
                               cache_modifier=".cg")
            tl.store(out_ptrs, tot.to(out_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch (graph replays)
    else:
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def dup_pairs(w, R: tl.constexpr):
    """(R, 16) words -> (R, 32): element 2c and 2c+1 both hold word c, side by side in one
    thread (so a pack=2 inline asm receives one word and writes two 16-bit values)."""
    return tl.reshape(tl.join(w, w), (R, 32))


@triton.jit
def pair_qz(wd, zc, SH: tl.constexpr, BF16: tl.constexpr):
    """(q - z) in fp16 or bf16, (R, 32), from pairs-layout words (repack.py) duplicated by
    :func:`dup_pairs` and shifted so the plane's nibbles sit at bits SH and 16 + SH.

    One LOP3 ors the two nibbles into the mantissas of a half2 of 1024 (fp16: 0x6400) or 128
    (bf16: 0x4300), one fma.f16x2/bf16x2 subtracts the offset and the zero point exactly:
    ``zc`` = -(2**(10-SH) + z) (fp16, SH in {0, 4}; the fma also scales by 2**-SH) or
    -(128 + z) (bf16, SH = 0). Two weights per instruction.
    """
    if BF16:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, s; lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xea; "
            "mov.b32 s, 0x3F803F80; fma.rn.bf16x2 $0, t, s, $3; }",
            "=r,r,r,r", [wd, zc], dtype=tl.bfloat16, is_pure=True, pack=2)
    elif SH == 0:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, s; lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xea; "
            "mov.b32 s, 0x3C003C00; fma.rn.f16x2 $0, t, s, $3; }",
            "=r,r,r,r", [wd, zc], dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, s; lop3.b32 t, $1, 0x00F000F0, 0x64006400, 0xea; "
            "mov.b32 s, 0x2C002C00; fma.rn.f16x2 $0, t, s, $3; }",
            "=r,r,r,r", [wd, zc], dtype=tl.float16, is_pure=True, pack=2)
