"""Trust no file: corrupted, edited or escaping checkpoints are one clear CheckpointError.

Each corruption is tried twice where it makes sense: with the checksums (the default, which
must name the altered tensor or config.json) and with ``verify=False`` (the value checks of
kvant.formats.integrity must still catch it). ``kvant eval`` answers exit code 2 and one line.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kvant
from ckpt_helpers import tiny_quantized, tree_digest
from kvant.cli import main
from kvant.errors import CheckpointError
from kvant.formats import checkpoint as ckpt
from kvant.formats.integrity import check_layer
from kvant.nn.qlinear import QuantLinear

LAYER = "blocks.0.sa.heads.0.key"  # a quantized 64 -> 32 layer of the tiny model
SHARD = "model-00001-of-00001.safetensors"


def _act_order(model) -> None:
    """Give LAYER a (valid, trivial) act-order g_idx, as GPTQ with act_order stores it."""
    m = model.get_submodule(LAYER)
    m.g_idx = torch.arange(m.in_features, dtype=torch.int32) // m.group_size
    m._init_kwargs["act_order"] = True


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    model, tok = tiny_quantized(bits=4)
    _act_order(model)
    return model, kvant.save_quantized(model, tmp_path_factory.mktemp("pristine") / "ck", tok)


@pytest.fixture
def ck(pristine, tmp_path):
    """(model, a fresh copy of its checkpoint) for a test to corrupt."""
    model, src = pristine
    return model, Path(shutil.copytree(src, tmp_path / "ck"))


def _meta(out):
    return json.loads((out / "config.json").read_text())


def _write_meta(out, meta) -> None:
    (out / "config.json").write_text(json.dumps(meta, indent=1))


def _edit_tensor(out, name, fn) -> None:
    """Rewrite the shard with ``fn(tensor)`` in place of tensor ``name`` (same size)."""
    state = load_file(str(out / SHARD))
    state[name] = fn(state[name].clone())
    save_file(state, str(out / SHARD), metadata={"format": "pt"})


def _span(path, name) -> tuple[int, int]:
    """Byte range of tensor ``name``'s data in a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _load_fails(out, match, verify=True) -> None:
    before = tree_digest(out.parent)
    with pytest.raises(CheckpointError, match=match):
        kvant.load_quantized(out, verify=verify)
    assert tree_digest(out.parent) == before  # loading never changes a file


def test_act_order_checkpoint_round_trip(ck):
    model, out = ck
    loaded, _ = kvant.load_quantized(out)
    x = torch.randint(0, 65, (2, 16))
    assert torch.equal(loaded(x), model(x))
    assert loaded.get_submodule(LAYER).g_idx is not None


def test_zeroed_shard(ck):
    _, out = ck
    f = out / SHARD
    raw = bytearray(f.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[8 + n:] = bytes(len(raw) - 8 - n)  # every tensor byte zero, header intact
    f.write_bytes(raw)
    _load_fails(out, "is corrupted or was altered")


@pytest.mark.parametrize("tensor", [f"{LAYER}.qweight", "token_embedding_table.weight"])
def test_flipped_byte(ck, tensor):
    _, out = ck
    f = out / SHARD
    raw = bytearray(f.read_bytes())
    start, _ = _span(f, tensor)
    raw[start + 3] ^= 0x10
    f.write_bytes(raw)
    _load_fails(out, f"tensor '{tensor}' is corrupted")
    kvant.load_quantized(out, verify=False)  # a trusted file: the caller's choice


@pytest.mark.parametrize("tensor,edit,match", [
    ("scales", lambda t: t.index_fill_(1, torch.tensor([0]), float("nan")), "scales holds NaN"),
    ("scales", lambda t: t.index_fill_(1, torch.tensor([1]), float("inf")), "scales holds NaN"),
    # G = 2 four-bit zero points use 8 bits of the word; bit 12 is padding
    ("qzeros", lambda t: t | (1 << 12), "qzeros holds zero points beyond"),
    ("g_idx", lambda t: t.index_fill_(0, torch.tensor([5]), 2),
     r"g_idx holds groups outside \[0, 2\)"),
    ("g_idx", lambda t: t.index_fill_(0, torch.tensor([5]), -1), "g_idx holds groups outside"),
])
def test_bad_values(ck, tensor, edit, match):
    _, out = ck
    _edit_tensor(out, f"{LAYER}.{tensor}", edit)
    _load_fails(out, f"tensor '{LAYER}.{tensor}' is corrupted")  # the checksum first
    _load_fails(out, match, verify=False)  # the value check on its own
    meta = _meta(out)
    del meta["integrity"]  # a checkpoint written before checksums: same value check
    _write_meta(out, meta)
    _load_fails(out, match)


def test_nan_outside_quantized_layers_without_checksums(ck):
    _, out = ck
    _edit_tensor(out, "ln_f.weight", lambda t: t.index_fill_(0, torch.tensor([3]), float("nan")))
    meta = _meta(out)
    del meta["integrity"]
    _write_meta(out, meta)
    _load_fails(out, "'ln_f.weight' holds NaN or Inf")


def test_edited_top_level_bits_and_method(ck):
    _, out = ck
    meta = _meta(out)
    meta["quantization_config"]["bits"] = 3
    _write_meta(out, meta)
    _load_fails(out, "config.json was edited after kvant wrote it")
    _load_fails(out, "has bits=4 but the checkpoint's quantization_config says bits=3",
                verify=False)
    meta["quantization_config"]["bits"] = 4
    meta["quantization_config"]["method"] = "gptq"
    _write_meta(out, meta)
    _load_fails(out, "config.json was edited")


def test_edited_module_dtype(ck):
    _, out = ck
    meta = _meta(out)
    meta["quantization_config"]["modules"][LAYER]["dtype"] = "bfloat16"
    _write_meta(out, meta)
    _load_fails(out, "config.json was edited")
    _load_fails(out, f"module '{LAYER}' says dtype bfloat16 but the model's other tensors "
                     "are float32", verify=False)


@pytest.mark.parametrize("fname", ["../elsewhere.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_path_escaping_refused(ck, fname):
    _, out = ck
    meta = _meta(out)
    meta["files"][fname] = meta["files"].pop(SHARD)
    (out.parent / "elsewhere.safetensors").write_bytes((out / SHARD).read_bytes())
    _write_meta(out, meta)
    for verify in (True, False):
        _load_fails(out, "is not a plain file name inside the checkpoint", verify=verify)


def _edit_module(entry_edit):
    def edit(meta):
        entry_edit(meta["quantization_config"]["modules"])
    return edit


def _rename_module(mods):
    mods["blocks.0.sa.heads.0.nope"] = mods.pop(LAYER)


def _move_tensor(meta):
    meta["tied"] = {"lm_head.weight": "no.such.tensor"}


# 14 edits of shapes, dtypes and keys: each one line, never a raw load_state_dict error
EDITS = {
    "in_features": (_edit_module(lambda m: m[LAYER].update(in_features=128)), "128"),
    "out_features": (_edit_module(lambda m: m[LAYER].update(out_features=16)), "16x64"),
    "group_size": (_edit_module(lambda m: m[LAYER].update(group_size=16)), "group_size"),
    "group_size_bad": (_edit_module(lambda m: m[LAYER].update(group_size=48)), "group_size"),
    "bits_module": (_edit_module(lambda m: m[LAYER].update(bits=3)), "bits=3"),
    "bits_bad": (_edit_module(lambda m: m[LAYER].update(bits=5)), "bits"),
    "act_order_off": (_edit_module(lambda m: m[LAYER].update(act_order=False)), "unexpected"),
    "bias_on": (_edit_module(lambda m: m[LAYER].update(bias=True)), "missing"),
    "dtype_bad": (_edit_module(lambda m: m[LAYER].update(dtype="float99")), LAYER),
    "kind_unknown": (_edit_module(lambda m: m[LAYER].update(kind="exl9")), "exl9"),
    "kind_missing": (_edit_module(lambda m: m[LAYER].pop("kind")), "has no 'kind'"),
    "extra_key": (_edit_module(lambda m: m[LAYER].update(colour="red")), "colour"),
    "renamed": (_edit_module(_rename_module), "not a layer of the model"),
    "tied": (_move_tensor, "'tied' entry"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_edited_metadata_is_one_clear_error(ck, case):
    _, out = ck
    edit, match = EDITS[case]
    meta = _meta(out)
    edit(meta)
    _write_meta(out, meta)
    _load_fails(out, "config.json was edited")
    _load_fails(out, match, verify=False)


def test_renamed_and_reshaped_tensors(ck):
    _, out = ck
    state = load_file(str(out / SHARD))
    state[f"{LAYER}.qweights"] = state.pop(f"{LAYER}.qweight")
    save_file(state, str(out / SHARD), metadata={"format": "pt"})
    _load_fails(out, "does not hold the tensors config.json lists", verify=False)
    meta = _meta(out)
    meta["files"][SHARD]["tensors"] = sorted(state)
    meta["files"][SHARD]["bytes"] = (out / SHARD).stat().st_size
    _write_meta(out, meta)
    _load_fails(out, r"missing \['qweight'\], unexpected \['qweights'\]", verify=False)
    state[f"{LAYER}.qweight"] = state.pop(f"{LAYER}.qweights")[:, :4].contiguous()
    save_file(state, str(out / SHARD), metadata={"format": "pt"})
    meta["files"][SHARD].update(tensors=sorted(state), bytes=(out / SHARD).stat().st_size)
    _write_meta(out, meta)
    _load_fails(out, rf"'{LAYER}.qweight' is int32 \[32, 4\]", verify=False)


def test_eval_and_inspect_exit_2(ck, tmp_path, capsys):
    _, out = ck
    text = tmp_path / "t.txt"
    text.write_text("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. " * 20)
    ev = ["eval", str(out), "--ppl", str(text), "--max-windows", "2"]
    assert main(ev) == 0
    capsys.readouterr()
    f = out / SHARD
    raw = bytearray(f.read_bytes())
    raw[_span(f, f"{LAYER}.scales")[0] + 1] ^= 0x7C  # exponent bits: a huge or NaN scale
    f.write_bytes(raw)
    for argv in (ev, ["inspect", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvant: error: ") and err.count("\n") == 1
        assert f"'{LAYER}.scales' is corrupted" in err
    assert main(ev + ["--no-verify"]) in (0, 2)  # value checks decide (NaN or just wrong)


def _zero_shard(out):
    f = out / SHARD
    raw = bytearray(f.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    f.write_bytes(bytes(raw[:8 + n]) + bytes(len(raw) - 8 - n))


def _flip(out, tensor):
    f = out / SHARD
    raw = bytearray(f.read_bytes())
    raw[_span(f, tensor)[0] + 3] ^= 0x10
    f.write_bytes(raw)


def _edit_config(fn):
    def edit(out):
        meta = _meta(out)
        fn(meta)
        _write_meta(out, meta)
    return edit


def _escape(meta):
    meta["files"]["../x.safetensors"] = meta["files"].pop(SHARD)


# case -> (corrupt(out), message by default, message with --no-verify or None: loads)
CLI_CASES = {
    "zeroed_shard": (_zero_shard, "is corrupted", None),
    "flipped_qweight": (lambda o: _flip(o, f"{LAYER}.qweight"), "is corrupted", None),
    "flipped_embedding": (lambda o: _flip(o, "token_embedding_table.weight"), "is corrupted",
                          None),
    "nan_scale": (lambda o: _edit_tensor(o, f"{LAYER}.scales", lambda t: t.fill_(float("nan"))),
                  "scales' is corrupted", "scales holds NaN"),
    "zero_point": (lambda o: _edit_tensor(o, f"{LAYER}.qzeros", lambda t: t | (1 << 20)),
                   "qzeros' is corrupted", "qzeros holds zero points beyond"),
    "g_idx": (lambda o: _edit_tensor(o, f"{LAYER}.g_idx", lambda t: t + 1),
              "g_idx' is corrupted", "g_idx holds groups outside"),
    "bits": (_edit_config(lambda m: m["quantization_config"].update(bits=8)), "was edited",
             "has bits=4 but"),
    "dtype": (_edit_config(lambda m: m["quantization_config"]["modules"][LAYER].update(
        dtype="float16")), "was edited", "says dtype float16"),
    "path_escape": (_edit_config(_escape), "not a plain file name", "not a plain file name"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_eval_exit_2(ck, capsys, case):
    _, out = ck
    corrupt, msg, msg_no_verify = CLI_CASES[case]
    corrupt(out)
    for argv, match in ((["eval", str(out)], msg), (["eval", str(out), "--no-verify"],
                                                     msg_no_verify)):
        if match is None:  # nothing but the checksum can see this change
            continue
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvant: error: ") and err.count("\n") == 1, err
        assert match in err


def test_inspect_reports_verification(ck, capsys):
    _, out = ck
    assert main(["inspect", str(out)]) == 0
    n = sum(len(i["tensors"]) for i in _meta(out)["files"].values())
    assert f"integrity: {n} tensors match their sha256 checksums" in capsys.readouterr().out
    assert main(["inspect", str(out), "--no-verify"]) == 0
    assert "--no-verify" in capsys.readouterr().out


# ---- value checks of every layer kind, on hand-built layers ------------------------------

@pytest.mark.parametrize("bits,k", [(2, 20), (3, 20), (4, 20), (8, 6), (3, 64)])
def test_qweight_padding(bits, k):
    m = QuantLinear(k, 4, bits, -1)
    check_layer("l", m)  # zeros: valid
    used = k * bits - (m.qweight.shape[1] - 1) * 32
    if used == 32:  # no padding: every bit pattern is a valid code
        m.qweight.fill_(-1)
        check_layer("l", m)
        return
    m.qweight[2, -1] = 1 << used
    with pytest.raises(CheckpointError, match=f"qweight has bits set beyond its {k} {bits}-bit"):
        check_layer("l", m)


def test_spqr_checks():
    from kvant.nn.spqr_linear import SpQRLinear

    def layer():
        m = SpQRLinear(64, 32, 3, 16, nnz=3, act_order=True)
        m.outlier_rowptr.copy_(torch.tensor([0] * 5 + [3] * 28, dtype=torch.int32))
        m.outlier_cols.copy_(torch.tensor([1, 7, 63], dtype=torch.int16))
        return m

    check_layer("s", layer())
    for edit, match in [
        (lambda m: m.outlier_cols.__setitem__(2, 64), "outlier_cols holds columns outside"),
        (lambda m: m.outlier_rowptr.__setitem__(-1, 2), "not a CSR row pointer"),
        (lambda m: m.outlier_rowptr.__setitem__(3, 2), "not a CSR row pointer"),
        (lambda m: m.perm.__setitem__(0, 1), "perm is not a permutation"),
        (lambda m: m.outlier_vals.__setitem__(0, float("nan")), "outlier_vals holds NaN"),
        (lambda m: m.scale_stats.__setitem__((0, 0, 0), float("inf")), "scale_stats holds"),
    ]:
        m = layer()
        edit(m)
        with pytest.raises(CheckpointError, match=match):
            check_layer("s", m)


def test_quip_checks():
    from kvant.nn.quip_linear import QuipLinear

    m = QuipLinear(86, 32, 4, -1)  # 86 = 2 * 43: a stored random factor of order 43
    assert m.factor_in is not None and m.factor_in.shape == (43, 43)
    check_layer("q", m)
    m.sign_in[-1] = 1 << 6  # 86 signs use 6 bits of the last byte
    with pytest.raises(CheckpointError, match="sign_in has bits set beyond its 86 signs"):
        check_layer("q", m)
    m = QuipLinear(86, 32, 4, -1)
    m.factor_in.mul_(2)
    with pytest.raises(CheckpointError, match="factor_in is not an orthogonal matrix"):
        check_layer("q", m)


def test_verify_checkpoint_without_model(ck):
    """The inspect path checks every layer from the files alone."""
    _, out = ck
    info = ckpt.verify_checkpoint(out)
    assert info["checksums"] and info["layers"] == 18
    _edit_tensor(out, f"{LAYER}.g_idx", lambda t: t.index_fill_(0, torch.tensor([0]), 7))
    with pytest.raises(CheckpointError, match="g_idx holds groups outside"):
        ckpt.verify_checkpoint(out, verify=False)
