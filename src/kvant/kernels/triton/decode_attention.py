"""Split-KV attention for decode steps over grouped-query heads (the flash-decoding idea).

A decode step reads the whole key/value cache for very few query rows: B·H_kv key/value heads
with R = G·q rows each (the G query heads of a group folded into rows, serve/attention.py).
A prefill kernel runs one program per head, which leaves most SMs idle at decode: on an H200,
a Llama-3-70B block at batch 1 (8 key/value heads, 2048 cached positions) took 46 µs in
cuDNN's flash kernel for an 8 MB cache (decode_70b profile, 2026-12-03). Here the T cached
positions are cut into S splits, one program each, and a second pass merges the splits:

    pass 1, grid (B·H_kv, S): over its split, BT keys at a time with an online softmax,
        m (R,)     the running max of the scores (log2 domain: scores · scale · log2 e)
        l (R,)     Σ 2^(s - m)
        acc (R, D) Σ 2^(s - m) v                      -> float32 partials per (head, split)
    pass 2, grid (B·H_kv·R,): M = max_s m_s, out = Σ_s 2^(m_s - M) acc_s / Σ_s 2^(m_s - M) l_s,
        stored straight into the model's (B, q, H, D) layout (no transpose copy after).

Row r of a group is query head h_kv·G + r // q at query position r % q; the mask (B or 1, 1,
q, T), boolean (True: attend) or additive, is read at that position. A row with no key to
attend to in the whole cache comes out NaN (0 / 0), as SDPA's math path gives.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit(do_not_specialize=["T", "split_len"])
def _partials_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
                     R, T, HKV, Q, S, split_len, qk_scale,
                     sq_b, sq_h, sq_r, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b, sm_q, sm_t,
                     MASK: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr,
                     D: tl.constexpr):
    """One (head, split): partial m, l (B·H_kv, S, BR) and acc (B·H_kv, S, BR, D), float32."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_r = tl.arange(0, BR)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, BT)
    r_ok = offs_r < R
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + h * sq_h + offs_r[:, None] * sq_r
                + offs_d[None, :], mask=r_ok[:, None], other=0.0)  # (BR, D)
    k_base = k_ptr + b.to(tl.int64) * sk_b + h * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + h * sv_h
    m_row = mask_ptr + b.to(tl.int64) * sm_b + (offs_r % Q) * sm_q  # (BR,) position r % q
    m_i = tl.full((BR,), float("-inf"), tl.float32)
    l_i = tl.zeros((BR,), tl.float32)
    acc = tl.zeros((BR, D), tl.float32)
    t_lo = pid_s * split_len
    t_hi = tl.minimum(t_lo + split_len, T)
    for t0 in range(t_lo, t_hi, BT):
        t = t0 + offs_t
        t_ok = t < t_hi
        k = tl.load(k_base + t[:, None] * sk_t + offs_d[None, :], mask=t_ok[:, None],
                    other=0.0)  # (BT, D)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BR, BT) float32, log2 domain
        ok = r_ok[:, None] & t_ok[None, :]
        if MASK == 1:
            keep = tl.load(m_row[:, None] + t[None, :] * sm_t, mask=ok, other=0)
            ok = ok & (keep != 0)
        if MASK == 2:
            add = tl.load(m_row[:, None] + t[None, :] * sm_t, mask=ok, other=0.0)
            s = s + add.to(tl.float32) * 1.4426950408889634
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing to attend to so far keeps m = -inf: subtract 0 there, not -inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + t[:, None] * sv_t + offs_d[None, :], mask=t_ok[:, None],
                    other=0.0)  # (BT, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    row = (pid_bh * S + pid_s) * BR + offs_r  # (BR,) padded rows are written, never read
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)
    tl.store(acc_ptr + row[:, None].to(tl.int64) * D + offs_d[None, :], acc)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, R, HKV, Q, G, S, so_b, so_q, so_h,
                    BR: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    """One (head, row): merge the S splits into out[b, r % q, h_kv·G + r // q, :]."""
    pid = tl.program_id(0)
    bh = pid // R
    r = pid % R
    offs_s = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < S
    row = (bh * S + offs_s) * BR + r  # (BS,)
    m = tl.load(m_ptr + row, mask=s_ok, other=float("-inf"))
    l_s = tl.load(l_ptr + row, mask=s_ok, other=0.0)
    w = tl.where(s_ok, tl.exp2(m - tl.max(m, 0)), 0.0)  # (BS,)
    acc = tl.load(acc_ptr + row[:, None].to(tl.int64) * D + offs_d[None, :],
                  mask=s_ok[:, None], other=0.0)  # (BS, D)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    b = bh // HKV
    head = (bh % HKV) * G + r // Q
    tl.store(out_ptr + b.to(tl.int64) * so_b + (r % Q) * so_q + head * so_h + offs_d,
             o.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any count gives the same result
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(heads: int, t: int, bt: int, sms: int) -> tuple[int, int]:
    """(splits S, keys per split): about two programs per SM over ``heads`` (B·H_kv)
    key/value heads, each split a whole number of BT-key tiles."""
    tiles = triton.cdiv(t, bt)
    want = max(1, min(tiles, triton.cdiv(2 * sms, heads)))
    split_len = triton.cdiv(tiles, want) * bt
    return triton.cdiv(t, split_len), split_len


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, q_len: int, splits: int | None = None) -> torch.Tensor:
    """Attention of q (B, H_kv, R = G·q_len, D) over k, v (B, H_kv, T, D) -> (B, q_len, G·H_kv,
    D) in q's dtype. mask: None or (B or 1, 1, q_len, ≥ T), boolean (True: attend) or
    additive. ``splits`` forces S (tests); default :func:`plan_splits`. The last dim of q, k,
    v must be contiguous and D a power of two ≥ 16 (serve/attention.py checks)."""
    b, hkv, r, d = q.shape
    t = k.shape[2]
    g = r // q_len
    br = max(16, triton.next_power_of_2(r))
    bt = 64 if d <= 128 else 32
    if splits is None:
        n_split, split_len = plan_splits(b * hkv, t, bt, _sm_count(q.device))
    else:
        split_len = triton.cdiv(triton.cdiv(t, splits), bt) * bt
        n_split = triton.cdiv(t, split_len)
    f32 = dict(dtype=torch.float32, device=q.device)
    m_p = torch.empty(b * hkv, n_split, br, **f32)
    l_p = torch.empty(b * hkv, n_split, br, **f32)
    acc_p = torch.empty(b * hkv, n_split, br, d, **f32)
    if mask is None:
        kind, mk, sm = MASK_NONE, q, (0, 0, 0)  # any pointer: never read
    else:
        kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
        mk = mask.view(torch.uint8) if kind == MASK_BOOL else mask
        sm = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2), mask.stride(3))
    _partials_kernel[(b * hkv, n_split)](
        q, k, v, mk, m_p, l_p, acc_p, r, t, hkv, q_len, n_split, split_len, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *sm,
        MASK=kind, BR=br, BT=bt, D=d, num_warps=4, num_stages=2)
    out = torch.empty(b, q_len, g * hkv, d, dtype=q.dtype, device=q.device)
    _combine_kernel[(b * hkv * r,)](
        m_p, l_p, acc_p, out, r, hkv, q_len, g, n_split, out.stride(0), out.stride(1),
        out.stride(2), BR=br, BS=max(2, triton.next_power_of_2(n_split)), D=d, num_warps=2)
    return out
