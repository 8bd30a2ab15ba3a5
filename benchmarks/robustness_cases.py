"""The hostile-input cases of benchmarks/robustness.py (issue 17): :func:`cases`, the list
(what each case runs, what it expects and how its result is checked)."""

from __future__ import annotations
import shutil
import signal
import subprocess

from robustness_tools import (Case, ENV, PY, between_renames, ckpt_loads, concurrent, edit_config, edit_tensor, first_module, flip, kill_during_save, loads_after_swap, nan_param, no_leftovers, prior_ck, quantized_all_but, shard, spqr_defaults, zero_tensor_bytes)  # noqa: E402


def cases() -> list[Case]:
    Q = ["quantize", "tiny", "--group-size", "32"]
    QG = Q + ["--method", "gptq"]
    c: list[Case] = []
    add = c.append
    # -- data loss -------------------------------------------------------------------------
    def victim(d):
        (d / "victim").mkdir()
        (d / "victim" / "thesis.tex").write_text("years of work")
    add(Case("out_foreign_dir", "data_loss", Q + ["--out", "victim"], setup=victim))
    add(Case("out_foreign_dir_overwrite", "data_loss", Q + ["--out", "victim", "--overwrite"],
             setup=victim))
    add(Case("out_source_dir", "data_loss", Q + ["--out", "tiny", "--overwrite"]))
    add(Case("out_cwd", "data_loss", Q + ["--out", "$PWD"]))
    add(Case("out_dot", "data_loss", Q + ["--out", ".", "--overwrite"]))
    add(Case("out_existing_file", "data_loss", Q + ["--out", "notes.txt", "--overwrite"]))
    add(Case("out_existing_ckpt_no_overwrite", "data_loss", Q + ["--out", "ck"],
             needs=("tiny", "ck")))
    add(Case("out_existing_ckpt_overwrite", "data_loss", Q + ["--out", "ck", "--overwrite"],
             expect="ok", needs=("tiny", "ck"), may_change=("ck",), check=ckpt_loads("ck")))
    def ck_plus_user_file(d):
        (d / "ck" / "my_notes.txt").write_text("mine")
    add(Case("out_ckpt_holding_user_file", "data_loss", Q + ["--out", "ck", "--overwrite"],
             needs=("tiny", "ck"), setup=ck_plus_user_file))
    add(Case("export_over_checkpoint", "data_loss",
             ["export", "hfck", "--format", "gptq", "--out", "hfck", "--overwrite"],
             needs=("hfck",)))
    add(Case("export_to_foreign_dir", "data_loss",
             ["export", "hfck", "--format", "gptq", "--out", "victim"], needs=("hfck",),
             setup=victim))
    add(Case("concurrent_runs_same_out", "data_loss", runner=concurrent, may_change=("out",),
             check=no_leftovers, timeout=600))
    add(Case("sigkill_during_save", "data_loss", runner=kill_during_save(signal.SIGKILL),
             expect="ok", needs=("ck",), setup=prior_ck, check=loads_after_swap,
             may_change=("out",), timeout=600))
    add(Case("sigterm_during_save", "data_loss", runner=kill_during_save(signal.SIGTERM),
             expect="ok", needs=("ck",), setup=prior_ck, check=loads_after_swap,
             may_change=("out",), timeout=600))
    add(Case("kill_between_renames", "data_loss", runner=between_renames, expect="ok",
             needs=("ck",), setup=prior_ck, check=loads_after_swap,
             may_change=("out", ".out.old-0000abcd", ".out.tmp-0000beef")))
    # -- corrupted / edited checkpoints ----------------------------------------------------
    E = ["eval", "ck", "--max-windows", "2"]
    CK = ("ck",)
    corrupt = [
        ("zeroed_shard_bytes", lambda d: zero_tensor_bytes(d / "ck")),
        ("flipped_qweight_bytes", lambda d: flip(d / "ck", "qweight")),
        ("flipped_embedding_bytes", lambda d: flip(d / "ck", "token_embedding")),
        ("nan_scales", lambda d: edit_tensor(d / "ck", "scales",
                                              lambda t: t.fill_(float("nan")))),
        ("inf_scales", lambda d: edit_tensor(d / "ck", "scales",
                                              lambda t: t.fill_(float("inf")))),
        ("zero_points_out_of_range", lambda d: edit_tensor(d / "ck", "qzeros",
                                                            lambda t: t.fill_(-1))),
        ("truncated_shard", lambda d: shard(d / "ck").write_bytes(
            shard(d / "ck").read_bytes()[:-100])),
        ("missing_shard", lambda d: shard(d / "ck").unlink()),
        ("config_not_json", lambda d: (d / "ck" / "config.json").write_text("{nope")),
        ("edited_top_bits", lambda d: edit_config(
            d / "ck", lambda m: m["quantization_config"].update(bits=2))),
        ("edited_top_method", lambda d: edit_config(
            d / "ck", lambda m: m["quantization_config"].update(method="gptq"))),
        ("edited_module_bits", lambda d: edit_config(
            d / "ck", lambda m: first_module(m).update(bits=3))),
        ("edited_module_dtype", lambda d: edit_config(
            d / "ck", lambda m: first_module(m).update(dtype="float16"))),
        ("edited_module_shape", lambda d: edit_config(
            d / "ck", lambda m: first_module(m).update(out_features=7))),
        ("edited_module_kind", lambda d: edit_config(
            d / "ck", lambda m: first_module(m).update(kind="nope"))),
        ("deleted_module_key", lambda d: edit_config(
            d / "ck", lambda m: first_module(m).pop("in_features"))),
        ("path_escape_files_entry", lambda d: edit_config(
            d / "ck", lambda m: m.__setitem__("files", {"../elsewhere.safetensors": next(
                iter(m["files"].values()))} if isinstance(m.get("files"), dict) else
                ["../elsewhere.safetensors"]))),
    ]
    for name, setup in corrupt:
        add(Case(name, "checkpoint", E, setup=setup, needs=CK))
    # the same value edits with checksums skipped: only the value-range checks stand
    values = {"nan_scales", "inf_scales", "zero_points_out_of_range"}
    for name, setup in corrupt:
        if name in values:
            add(Case(name + "_no_verify", "checkpoint", E + ["--no-verify"], setup=setup,
                     needs=CK))

    def bad_gidx(d):
        code = ("import kvant, torch\n"
                "m, t = kvant.load_model('tiny')\n"
                "kvant.quantize(m, kvant.GPTQConfig(bits=4, group_size=32, act_order=True), "
                "kvant.calibration_for(m, t, n_samples=8, seq_len=32), "
                "kvant.EngineOptions(device='cpu', show_progress=False))\n"
                "kvant.save_quantized(m, 'ao', t)\n")
        subprocess.run([PY, "-c", code], cwd=d, env=ENV, check=True, capture_output=True)
        edit_tensor(d / "ao", "g_idx", lambda x: x.fill_(99))
    add(Case("g_idx_out_of_range", "checkpoint", ["eval", "ao", "--max-windows", "2"],
             setup=bad_gidx))
    add(Case("g_idx_out_of_range_no_verify", "checkpoint",
             ["eval", "ao", "--max-windows", "2", "--no-verify"], setup=bad_gidx))
    add(Case("inspect_corrupted", "checkpoint", ["inspect", "ck"], needs=CK,
             setup=lambda d: zero_tensor_bytes(d / "ck")))
    # -- silent wrong results (calibration, configs) ---------------------------------------
    # the tiny model has 2 blocks of 9 Linears; each pattern names one Linear per block
    add(Case("ignore_as_string", "silent", Q + ["--option", "ignore=proj", "--out", "o"],
             expect="ok", may_change=("o",), check=quantized_all_but("o", "proj", 16)))
    add(Case("ignore_suffix_net0", "silent", Q + ["--option", "ignore=net.0", "--out", "o"],
             expect="ok", may_change=("o",), check=quantized_all_but("o", "net.0", 16)))
    add(Case("ignore_matches_nothing", "silent", Q + ["--option", "ignore=nothere",
                                                      "--out", "o"]))
    for pname in ("lm_head.weight", "ln_f.weight", "blocks.0.ffwd.net.0.bias",
                  "token_embedding_table.weight", "blocks.1.sa.heads.0.key.weight"):
        add(Case(f"nan_in_{pname.replace('.', '_')}", "silent", Q + ["--out", "o"],
                 setup=nan_param(pname)))
    for flag, val in (("--seq-len", "-5"), ("--seq-len", "0"), ("--n-samples", "0"),
                      ("--n-samples", "-3"), ("--seq-len", "99999")):
        add(Case(f"gptq{flag.replace('-', '_')}_{val}", "silent", QG + [flag, val, "--out", "o"]))
    add(Case("duplicate_spec_key", "silent", QG + ["--option", "bits=3", "--option", "bits=2",
                                                   "--out", "o"]))
    add(Case("flag_and_option_same_key", "silent", QG + ["--bits", "3", "--option", "bits=2",
                                                         "--out", "o"]))
    add(Case("duplicate_key_api_spec", "silent",
             code="from kvant.algorithms.registry import config_from_spec\n"
                  "config_from_spec('gptq:bits=3,bits=2')"))
    add(Case("spqr_outlier_threshold_nan", "silent",
             ["quantize", "tiny", "--method", "spqr", "--option", "outlier_threshold=nan",
              "--out", "o"]))
    add(Case("damp_percent_inf", "silent", QG + ["--damp-percent", "inf", "--out", "o"]))
    add(Case("spqr_keeps_its_defaults", "silent",
             ["quantize", "tiny", "--method", "spqr", "--option", "base=rtn", "--out", "o"],
             expect="ok", may_change=("o",), check=spqr_defaults))
    add(Case("calib_chars_outside_vocab", "silent", QG + ["--calib", "weird.txt", "--out", "o"],
             setup=lambda d: (d / "weird.txt").write_text("naïve ☃ " * 500)))
    calib_api = ("import kvant, torch\nm, t = kvant.load_model('tiny')\n"
                 "kvant.quantize(m, kvant.GPTQConfig(bits=4, group_size=32), {calib}, "
                 "kvant.EngineOptions(device='cpu', show_progress=False))")
    for name, calib in (("calib_ids_outside_vocab", "torch.full((4, 32), 999)"),
                        ("calib_negative_ids", "torch.full((4, 32), -1)"),
                        ("calib_float_tensor", "torch.rand(4, 32)"),
                        ("calib_1d_tensor", "torch.zeros(32, dtype=torch.long)"),
                        ("calib_3d_tensor", "torch.zeros(2, 4, 32, dtype=torch.long)")):
        add(Case(name, "silent", code=calib_api.format(calib=calib)))
    add(Case("api_n_samples_float", "silent",
             code="import kvant\nm, t = kvant.load_model('tiny')\n"
                  "kvant.calibration_for(m, t, n_samples=1e6, seq_len=32)"))
    # -- raw tracebacks --------------------------------------------------------------------
    add(Case("device_cuda_without_cuda", "traceback", Q + ["--device", "cuda", "--out", "o"]))
    add(Case("device_bogus", "traceback", Q + ["--device", "bogus", "--out", "o"]))
    add(Case("eval_device_bogus", "traceback", ["eval", "tiny", "--device", "bogus"]))
    add(Case("gguf_magic_only", "traceback", ["eval", "m.gguf"],
             setup=lambda d: (d / "m.gguf").write_bytes(b"GGUF")))
    add(Case("gguf_garbage_header", "traceback", ["eval", "m.gguf"],
             setup=lambda d: (d / "m.gguf").write_bytes(b"GGUF" + b"\xff" * 64)))
    add(Case("gguf_not_gguf", "traceback", ["eval", "m.gguf"],
             setup=lambda d: (d / "m.gguf").write_bytes(b"not a gguf file")))
    for fmt in ("gptq", "awq", "ct"):
        add(Case(f"eval_kvant_{fmt}_export", "traceback", ["eval", fmt, "--max-windows", "1"],
                 needs=(fmt,)))
    add(Case("quantize_kvant_gptq_export", "traceback", ["quantize", "gptq", "--out", "o"],
             needs=("gptq",)))
    add(Case("max_windows_negative", "traceback", ["eval", "tiny", "--max-windows", "-1"]))
    add(Case("max_windows_zero", "traceback", ["eval", "tiny", "--max-windows", "0"]))
    add(Case("eval_seq_len_zero", "traceback", ["eval", "tiny", "--seq-len", "0"]))
    add(Case("eval_seq_len_over_context", "traceback", ["eval", "tiny", "--seq-len", "64"]))
    add(Case("demo_windows_negative", "traceback", ["demo", "--windows", "-1", "--out", "o"]))
    add(Case("hf_ckpt_without_tokenizer", "traceback",
             ["eval", "hfck_notok", "--ppl", "text.txt", "--max-windows", "1", "--seq-len", "64"],
             needs=("hfck_notok",)))
    add(Case("hf_dir_without_tokenizer", "traceback", ["eval", "hfnotok"], needs=("hf",),
             setup=lambda d: [shutil.move(str(d / "hf"), str(d / "hfnotok"))] + [
                 p.unlink() for p in (d / "hfnotok").iterdir() if "token" in p.name]))
    add(Case("missing_local_path", "traceback", ["eval", "./no/such/model"]))
    add(Case("missing_local_dir_two_parts", "traceback", ["quantize", "models/llama/7b",
                                                          "--out", "o"]))
    add(Case("missing_home_path", "traceback", ["eval", "~/no-such-kvant-model"]))
    add(Case("missing_gguf", "traceback", ["eval", "nothere.gguf"]))
    add(Case("eval_a_text_file", "traceback", ["eval", "notes.txt"]))
    add(Case("inspect_not_a_checkpoint", "traceback", ["inspect", "tiny"]))
    add(Case("export_nanogpt_ckpt", "traceback", ["export", "ck", "--format", "gptq",
                                                  "--out", "o"], needs=CK))
    add(Case("unknown_method", "traceback", Q + ["--method", "nope", "--out", "o"]))
    add(Case("bits_5", "traceback", Q + ["--bits", "5", "--out", "o"]))
    add(Case("unknown_option_key", "traceback", Q + ["--option", "blocksize=3", "--out", "o"]))
    add(Case("option_without_value", "traceback", Q + ["--option", "bits", "--out", "o"]))
    add(Case("flag_not_for_method", "traceback", Q + ["--act-order", "--out", "o"]))
    add(Case("group_not_dividing", "traceback", ["quantize", "tiny", "--group-size", "48",
                                                 "--out", "o"]))
    add(Case("calib_file_missing", "traceback", QG + ["--calib", "nope.txt", "--out", "o"]))
    add(Case("eval_ppl_file_missing", "traceback", ["eval", "tiny", "--ppl", "nope.txt"]))
    add(Case("argparse_missing_out", "traceback", ["quantize", "tiny"]))
    # -- resources -------------------------------------------------------------------------
    add(Case("n_samples_100000_embedded", "resources",
             ["quantize", "nanogpt", "--method", "gptq", "--n-samples", "100000", "--out", "o"],
             needs=()))
    add(Case("n_samples_huge_hf", "resources",
             ["quantize", "hf", "--method", "gptq", "--group-size", "32", "--calib", "text.txt",
              "--seq-len", "128", "--n-samples", "1000000000", "--out", "o"], needs=("hf",)))
    # -- sanity: valid requests still work -------------------------------------------------
    add(Case("valid_gptq_quantize", "sanity", QG + ["--n-samples", "8", "--out", "o"],
             expect="ok", may_change=("o",), check=ckpt_loads("o")))
    add(Case("valid_eval_checkpoint", "sanity", E, expect="ok", needs=CK))
    return c


# ---------------------------------------------------------------------------------------
