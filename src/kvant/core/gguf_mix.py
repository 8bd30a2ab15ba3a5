"""llama.cpp's per-tensor types of a GGUF file type ("mix"), for Llama-family models.

``llama_model_quantize`` does not store every matrix of a file type in its base type. Its
rule is ``llama_tensor_get_type`` (with ``llama_tensor_get_type_impl`` and
``tensor_type_fallback``) in ``src/llama-quant.cpp`` of ggml-org/llama.cpp at 0c1e57098, the
commit llama-cpp-python 0.3.36 vendors (its CHANGELOG). This module restates that rule, as
facts, for the file types kvant writes; kvant rounds each tensor on the type it gives, so a
kvant file has exactly the tensor types (and so the size) of llama.cpp's file.

kvant's type name -> llama.cpp's file type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q6_K as named;
Q2_K -> MOSTLY_Q2_K; Q3_K -> MOSTLY_Q3_K_S; Q4_K -> MOSTLY_Q4_K_S; Q5_K -> MOSTLY_Q5_K_S.

The facts, for a model without experts, not Falcon (the rule's other branches), with
``n_layer`` decoder layers; ``i`` counts the tensors of a role in file order, which is the
layer index for a Llama GGUF:

- output head, or the token embedding when it is tied to the head: Q8_0 when the base is
  Q8_0 or the row width is not a multiple of the base type's block, else Q6_K. An untied
  token embedding keeps the base type.
- attn_v: MOSTLY_Q2_K -> Q4_K when n_head / n_head_kv >= 4, else Q3_K; MOSTLY_Q4_K_S -> Q5_K
  for i < 4. Then, for a "70B" Llama (80 layers with grouped KV heads), Q3_K / Q4_K -> Q5_K.
- ffn_down: MOSTLY_Q2_K -> Q3_K; MOSTLY_Q4_K_S -> Q5_K for i < n_layer / 8; with an
  importance matrix only, MOSTLY_Q4_0 -> Q4_1 and MOSTLY_Q5_0 -> Q5_1 for i < n_layer / 8
  (integer division throughout).
- attn_output: MOSTLY_Q2_K -> Q3_K.
- every other matrix (attn_q, attn_k, ffn_gate, ffn_up): the base type.
- finally a type whose block does not divide the row width falls back (Q2_K, Q3_K -> Q4_0;
  Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; :func:`kvant.core.gguf_grid.type_for_width`).

kvant calibrates GPTQ / AWQ on data, which is what llama.cpp's importance matrix stands for,
so callers pass ``imatrix=True`` for those methods and False for RTN without data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvant.core import gguf_grid as gg

# kvant's type (a grid "gguf:TYPE") -> llama.cpp's file type whose mix it follows
FILE_TYPES = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
              "Q8_0": "Q8_0", "Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S",
              "Q5_K": "Q5_K_S", "Q6_K": "Q6_K"}
# a decoder layer's Linear (Hugging Face Llama name) -> llama.cpp's tensor role
HF_ROLES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


@dataclass(frozen=True)
class LlamaShape:
    """What the rule reads of a model: decoder layers, attention heads and KV heads, and
    whether the token embedding doubles as the output head."""

    n_layer: int
    n_head: int
    n_head_kv: int
    tied: bool = True

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B for a Llama: 80 layers and fewer KV heads than heads."""
        return self.n_layer == 80 and self.n_head != self.n_head_kv


def _chosen(ftype: str, base: str, role: str, i: int, width: int, shape: LlamaShape,
            imatrix: bool) -> str:
    """llama.cpp's type for one tensor before the width fallback."""
    if role == "output" or (role == "token_embd" and shape.tied):
        if base == "Q8_0" or width % gg.TYPES[base].block:
            return "Q8_0"
        return "Q6_K"
    t = base
    if role == "attn_v":
        if ftype == "Q2_K":
            t = "Q4_K" if shape.n_head // shape.n_head_kv >= 4 else "Q3_K"
        elif ftype == "Q4_K_S" and i < 4:
            t = "Q5_K"
        if shape.is_70b and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"
    elif role == "ffn_down":
        early = i < shape.n_layer // 8
        if ftype == "Q2_K":
            t = "Q3_K"
        elif ftype == "Q4_K_S" and early:
            t = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and imatrix and early:
            t = "Q4_1" if ftype == "Q4_0" else "Q5_1"
    elif role == "attn_output" and ftype == "Q2_K":
        t = "Q3_K"
    return t


def tensor_type(base: str, name: str, width: int, shape: LlamaShape,
                imatrix: bool = True) -> str:
    """The GGUF type llama.cpp stores tensor ``name`` (its GGUF name: ``token_embd.weight``,
    ``output.weight`` or ``blk.N.ROLE.weight``) of row width ``width`` in, in a file of
    kvant's type ``base`` (a key of :data:`FILE_TYPES`); ``imatrix``: quantized with an
    importance matrix (calibration data). A ValueError for an unknown base or name."""
    base = str(base).upper()
    if base not in FILE_TYPES:
        raise ValueError(f"no llama.cpp file type for GGUF type {base!r}; one of "
                         f"{list(FILE_TYPES)}")
    m = _BLK.match(name)
    if m:
        i, role = int(m.group(1)), m.group(2)
        if role not in HF_ROLES.values():
            raise ValueError(f"tensor {name!r} is not a Llama decoder matrix")
    elif name in ("token_embd.weight", "output.weight"):
        i, role = 0, name.split(".")[0]
    else:
        raise ValueError(f"tensor {name!r} is not a Llama matrix llama.cpp quantizes")
    t = _chosen(FILE_TYPES[base], base, role, i, width, shape, imatrix)
    return gg.type_for_width(gg.TYPES[t], width, name).name


def file_types(base: str, shape: LlamaShape, widths: dict[str, int],
               imatrix: bool = True) -> dict[str, str]:
    """{GGUF tensor name: type} of every matrix of a Llama model, ``widths`` giving each
    role's row width (token_embd, attn_q, ..., ffn_down; output when untied)."""
    names = ["token_embd.weight"] + ([] if shape.tied else ["output.weight"])
    names += [f"blk.{i}.{r}.weight" for i in range(shape.n_layer) for r in HF_ROLES.values()]
    return {n: tensor_type(base, n, widths[_BLK.sub(r"\2", n).split(".")[0]], shape, imatrix)
            for n in names}


def gguf_name(layer: str, prefix: str) -> str | None:
    """llama.cpp's tensor name of the decoder Linear ``layer`` (a full name under the
    decoder list ``prefix``, e.g. ``model.layers.3.mlp.down_proj``); None when it is not one
    of a Llama layer's seven matrices."""
    m = re.match(re.escape(prefix) + r"\.(\d+)\.(.+)$", layer)
    if not m or m.group(2) not in HF_ROLES:
        return None
    return f"blk.{m.group(1)}.{HF_ROLES[m.group(2)]}.weight"
