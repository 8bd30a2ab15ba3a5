"""What a new user hits (issue 19, part 3): the summary at the end of ``kvant quantize`` and
the per-layer losses kept in the checkpoint (streamed runs too), ``kvant inspect``'s totals,
progress bars on a terminal only, the default seq_len on a short-context model, the
``datasets`` extra, ``--method`` choices and method defaults, and the demo plot."""

import json
import statistics
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kvant
from kvant import cli, cli_quantize
from kvant.model.nanogpt import GPTConfig, GPTLanguageModel, embedded_text

TINY = GPTConfig(vocab_size=65, n_embd=32, n_head=2, n_layer=2, block_size=32, dropout=0.0)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory holding a tiny nanoGPT weight dir ``tiny/``."""
    torch.manual_seed(0)
    d = tmp_path / "tiny"
    d.mkdir()
    model = GPTLanguageModel(TINY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "w.safetensors"))
    vocab = "".join(sorted(set(embedded_text())))
    (d / "config.json").write_text(json.dumps({"model_type": "nanogpt", "config": TINY.to_dict(),
                                               "vocab": vocab, "shards": ["w.safetensors"]}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _terminal(monkeypatch, capsys, on: bool = True):
    """Make the captured stderr look like a terminal (or not) to tqdm."""
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: on, raising=False)


def _meta(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


GPTQ_TINY = ["quantize", "tiny", "--method", "gptq", "--group-size", "32", "--n-samples", "4"]


def test_quantize_prints_a_summary_and_keeps_the_losses(work, capsys):
    assert cli.main(GPTQ_TINY + ["--out", "q"]) == 0
    out = capsys.readouterr().out.splitlines()
    meta = _meta(work / "q")
    losses = meta["layer_losses"]
    assert sorted(losses) == sorted(meta["quantization_config"]["modules"])  # every layer
    assert all(v > 0 for v in losses.values())
    worst = sorted(losses.items(), key=lambda kv: kv[1], reverse=True)[:5]
    assert out[0].startswith("quantized 18 layers with gptq in ") and out[0].endswith("-> q")
    text = "\n".join(out)
    assert f"median {statistics.median(losses.values()):.4g}; worst five:" in text
    worst_lines = out[out.index(next(ln for ln in out if "worst five" in ln)) + 1:][:5]
    assert [ln.split()[-1] for ln in worst_lines] == [n for n, _ in worst]
    assert [float(ln.split()[0]) for ln in worst_lines] == pytest.approx(
        [v for _, v in worst], rel=1e-3)
    # bits/weight and size as the loaded model and the files say
    model, _ = kvant.load_quantized(work / "q")
    from kvant.eval.table import quantized_bits_per_weight
    assert f"bits/weight {quantized_bits_per_weight(model):.3f} over the quantized" in text
    size = sum(f.stat().st_size for f in (work / "q").glob("*.safetensors"))
    assert f"size {size / 1e6:.2f} MB on disk" in text
    assert "4-bit: 18" in text and "lm_head among them" in text


def test_quantize_json_has_the_summary(work, capsys):
    assert cli.main(GPTQ_TINY + ["--out", "q", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    s = res["summary"]
    losses = _meta(work / "q")["layer_losses"]
    assert s["losses"]["median"] == pytest.approx(statistics.median(losses.values()))
    assert s["bits_histogram"] == {"4": 18} and s["quantized_layers"] == res["layers"] == 18
    from kvant.eval.table import model_bytes, quantized_bits_per_weight

    model, _ = kvant.load_quantized(work / "q")
    assert s["bits_per_weight"] == pytest.approx(quantized_bits_per_weight(model))
    # every stored byte over every parameter; the tiny model's float tensors are float32
    n_params = s["quantized_weights"] + s["float_parameters"]
    assert s["bits_per_parameter"] * n_params / 8 == pytest.approx(
        model_bytes(model, float_bytes=4))


def test_inspect_totals_first_layers_on_request(work, capsys):
    assert cli.main(GPTQ_TINY + ["--out", "q"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", "q"]) == 0
    short = capsys.readouterr().out
    assert "bits/weight" in short and "method gptq, 4-bit, group g32" in short
    assert "blocks.0.ffwd" not in short.split("worst five:")[0]
    assert "(18 quantized layers; --layers lists them)" in short
    assert cli.main(["inspect", "q", "--layers"]) == 0
    full = capsys.readouterr().out
    assert full.index("bits/weight") < full.index("  blocks.0.sa.heads.0.key: quant 16x32")
    loss = _meta(work / "q")["layer_losses"]["blocks.0.sa.heads.0.key"]
    assert f"blocks.0.sa.heads.0.key: quant 16x32 bits=4 group=g32 loss={loss:.4g}" in full


def test_streamed_run_keeps_the_losses_too(tmp_path, capsys):
    pytest.importorskip("transformers")
    from hf_tiny import save_sharded_llama, text_sample

    src = save_sharded_llama(tmp_path / "m", layers=2)
    (tmp_path / "c.txt").write_text(text_sample(4000))
    assert cli.main(["quantize", str(src), "--method", "gptq", "--group-size", "32",
                     "--n-samples", "4", "--seq-len", "32", "--calib", str(tmp_path / "c.txt"),
                     "--out", str(tmp_path / "q")]) == 0
    assert "worst five" in capsys.readouterr().out
    meta = _meta(tmp_path / "q")
    assert not (tmp_path / ".q.partial").exists()  # it did stream (and finished)
    assert sorted(meta["layer_losses"]) == sorted(meta["quantization_config"]["modules"])
    assert len(meta["layer_losses"]) == 14 and all(v > 0 for v in meta["layer_losses"].values())


def test_eval_progress_on_a_terminal_only(work, capsys, monkeypatch):
    assert cli.main(["quantize", "tiny", "--group-size", "32", "--out", "q"]) == 0
    _terminal(monkeypatch, capsys, True)
    assert cli.main(["eval", "q", "--max-windows", "3"]) == 0
    err = capsys.readouterr().err
    assert "perplexity: 100%" in err
    assert cli.main(["eval", "q", "--max-windows", "3", "--json"]) == 0  # --json: quiet
    assert "perplexity" not in capsys.readouterr().err
    _terminal(monkeypatch, capsys, False)  # a log file or a pipe: no bar
    assert cli.main(["eval", "q", "--max-windows", "3"]) == 0
    assert capsys.readouterr().err == ""


def test_quantize_shows_capture_and_block_progress_on_a_terminal(work, capsys, monkeypatch):
    _terminal(monkeypatch, capsys, True)
    assert cli.main(GPTQ_TINY + ["--out", "q"]) == 0
    err = capsys.readouterr().err
    assert "capturing calibration inputs" in err and "gptq blocks: 100%" in err
    _terminal(monkeypatch, capsys, False)
    assert cli.main(GPTQ_TINY + ["--out", "q2"]) == 0
    assert capsys.readouterr().err == ""


def test_large_checkpoint_and_tokenizing_show_progress(tmp_path, capsys, monkeypatch):
    from kvant.formats.checkpoint import write_shards

    _terminal(monkeypatch, capsys, True)
    tensors = {f"t{i}": torch.zeros(1000) for i in range(4)}
    files = write_shards(tensors, tmp_path, max_bytes=4000)  # one shard per tensor
    assert len(files) == 4 and "writing checkpoint" in capsys.readouterr().err
    write_shards(tensors, tmp_path)  # one shard: no bar
    assert capsys.readouterr().err == ""
    pytest.importorskip("transformers")
    from hf_tiny import tiny_tokenizer
    from kvant.calib.data import calibration_data

    calibration_data(tiny_tokenizer(), ["some text " * 50] * 3, n_samples=2, seq_len=16)
    assert "tokenizing calibration text" in capsys.readouterr().err


def test_default_seq_len_is_the_context_of_a_short_model(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from hf_tiny import text_sample, tiny_llama, tiny_tokenizer
    from kvant.calib import budget

    src = tmp_path / "m"
    tiny_llama(vocab=300, ctx=48).save_pretrained(src)  # a 48-token context, not 2048
    tiny_tokenizer().save_pretrained(src)
    (tmp_path / "c.txt").write_text(text_sample(6000))
    model, tok = kvant.load_model(src)
    assert kvant.calibration_for(model, tok, [text_sample(6000)], n_samples=3).shape == (3, 48)
    seen = []
    real = budget.check_memory
    monkeypatch.setattr(budget, "check_memory",
                        lambda m, b, n, seq_len, *a, **k: seen.append(seq_len) or real(
                            m, b, n, seq_len, *a, **k))
    assert cli.main(["quantize", str(src), "--method", "gptq", "--group-size", "32",
                     "--n-samples", "2", "--calib", str(tmp_path / "c.txt"),
                     "--out", str(tmp_path / "q"), "--json"]) == 0
    # the CLI's estimate and the engine's check (on the real windows) saw the same length
    assert seen == [48, 48]
    rc = cli.main(["quantize", str(src), "--method", "gptq", "--seq-len", "64",
                   "--calib", str(tmp_path / "c.txt"), "--out", str(tmp_path / "q2")])
    assert rc == 2 and "seq_len 64 exceeds the model's context length 48" in \
        capsys.readouterr().err


def test_hub_calibration_without_datasets_names_the_extra(monkeypatch):
    pytest.importorskip("transformers")
    from hf_tiny import tiny_tokenizer
    from kvant.calib.data import CalibrationDataError, calibration_data

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(CalibrationDataError, match=r"pip install 'kvant\[hf\]'"):
        calibration_data(tiny_tokenizer(), "c4", n_samples=2, seq_len=16)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "datasets" in extras["hf"]


def test_method_choices_in_help_and_defaults_from_the_method(capsys):
    from kvant.algorithms.registry import available, config_class

    p = cli.build_parser()
    sub = p._subparsers._group_actions[0].choices["quantize"]
    assert "{" + ",".join(available()) + "}" in sub.format_help()
    for method in available():  # no flag given: exactly the method's own defaults
        args = p.parse_args(["quantize", "m", "--out", "o", "--method", method])
        assert cli_quantize.config_from_args(args) == config_class(method)(), method
    args = p.parse_args(["quantize", "m", "--out", "o", "--method", "spqr", "--quantize-head"])
    cfg = cli_quantize.config_from_args(args)
    assert (cfg.bits, cfg.group_size, cfg.quantize_head) == (3, 16, True)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["quantize", "m", "--out", "o", "--method", "gtpq"])
    assert e.value.code == 2 and "invalid choice: 'gtpq'" in capsys.readouterr().err


RECORDS = [{"method": "float", "ppl": 4.0},
           {"method": "rtn", "group_size": 128, "bits_per_weight": 4.16, "ppl": 4.04},
           {"method": "rtn", "group_size": 128, "bits_per_weight": 3.16, "ppl": 4.4},
           {"method": "rtn", "group_size": 128, "bits_per_weight": 2.16, "ppl": 40.0},
           {"method": "gptq", "group_size": 128, "bits_per_weight": 3.2, "ppl": 4.2}]


def test_demo_plot_shows_the_change_on_a_log_axis(tmp_path):
    pytest.importorskip("matplotlib")
    from kvant.eval.plot import plot_ppl_change

    drawn = plot_ppl_change(RECORDS, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000
    flat = {k: [x for p in v for x in p] for k, v in drawn["series"].items()}
    assert flat["rtn g128"] == pytest.approx([2.16, 900.0, 3.16, 10.0, 4.16, 1.0])
    assert flat["gptq g128"] == pytest.approx([3.2, 5.0])
    assert drawn["yscale"] == "log"
    labels = drawn["yticks"] + drawn["xticks"]
    assert "1" in drawn["yticks"] and "10" in drawn["yticks"] and "100" in drawn["yticks"]
    assert not any("^" in t or "$" in t or "e+" in t for t in labels), labels  # plain numbers
    assert drawn["legend"] == ["gptq g128", "rtn g128"]
    assert len(set(drawn["markers"])) == 2 and "None" not in drawn["markers"]
    # a method as good as float (change <= 0) is drawn on a symmetric-log axis, not dropped
    same = plot_ppl_change(RECORDS + [{"method": "rtn", "group_size": -1,
                                       "bits_per_weight": 8.0, "ppl": 3.99}],
                           tmp_path / "q.png", "t")
    assert same["yscale"] == "symlog"
    assert list(same["series"]["rtn channel"][0]) == pytest.approx([8.0, -0.25])


def test_demo_writes_the_change_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import kvant.demo

    calls = []
    real = kvant.demo.plot_ppl_change
    monkeypatch.setattr(kvant.demo, "plot_ppl_change",
                        lambda *a, **k: calls.append(real(*a, **k)))
    kvant.demo.run_demo(tmp_path, ["rtn:bits=4,group_size=128", "rtn:bits=2,group_size=128"],
                        windows=1)
    assert (tmp_path / "report.png").stat().st_size > 1000
    (drawn,) = calls
    (pts,) = drawn["series"].values()
    assert len(pts) == 2 and pts[0][1] > pts[1][1] > 0  # 2-bit far above 4-bit, both > float


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def _chat_llama(path: Path, template: str | None = CHAT_TEMPLATE) -> Path:
    """A tied tiny Llama (vocab 300, context 128) with the tiny tokenizer, whose chat
    template is ``template``, saved to ``path``."""
    import copy

    from hf_tiny import tiny_llama, tiny_tokenizer

    tiny_llama(vocab=300, ctx=128, tied=True).save_pretrained(path)
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


def _chat_file(path: Path, n: int = 6) -> Path:
    convs = [[{"role": "user", "content": f"what is {i} and {i + 1}? " * 6},
              {"role": "assistant", "content": f"they make {2 * i + 1}. " * 6}]
             for i in range(n)]
    path.write_text("\n".join(json.dumps({"messages": c}) for c in convs) + "\n")
    return path


def test_calib_chat_end_to_end(tmp_path, capsys, monkeypatch):
    """--calib-chat: the engine calibrates on windows of the conversations rendered with the
    model's own chat template (read back from its directory), and the run finishes."""
    pytest.importorskip("transformers")
    from kvant.calib.data import chat_calibration_data, encode, token_stream

    src = _chat_llama(tmp_path / "m")
    chat = _chat_file(tmp_path / "chat.jsonl")
    seen = []
    real = kvant.quantize_streaming
    monkeypatch.setattr(kvant, "quantize_streaming",
                        lambda model, config, calib, *a, **k: seen.append(calib) or real(
                            model, config, calib, *a, **k))
    assert cli.main(["quantize", str(src), "--method", "gptq", "--group-size", "32",
                     "--n-samples", "4", "--seq-len", "32", "--seed", "3",
                     "--calib-chat", str(chat), "--out", str(tmp_path / "q"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_calib"] == 4 and res["summary"]["quantized_layers"] == 14
    _, tok = kvant.load_model(src)
    assert tok.chat_template == CHAT_TEMPLATE  # the template travelled with the model
    (calib,) = seen
    assert torch.equal(calib, chat_calibration_data(tok, chat, 4, 32, seed=3))
    convs = [json.loads(ln)["messages"] for ln in chat.read_text().splitlines()]
    stream = token_stream(tok, [tok.apply_chat_template(c, tokenize=False) for c in convs])
    s, marker = stream.tolist(), encode(tok, "<|assistant|>")
    for row in calib.tolist():  # every window is a slice of the rendered conversations
        assert any(s[i:i + 32] == row for i in range(len(s) - 31))
    assert any(s[i:i + len(marker)] == marker for i in range(len(s)))
    meta = _meta(tmp_path / "q")
    assert len(meta["layer_losses"]) == 14 and all(v > 0 for v in meta["layer_losses"].values())


def test_calib_chat_refusals_are_one_line(tmp_path, capsys):
    pytest.importorskip("transformers")
    chat = _chat_file(tmp_path / "chat.jsonl")
    src = _chat_llama(tmp_path / "m", template=None)
    args = ["quantize", str(src), "--method", "gptq", "--group-size", "32", "--n-samples",
            "2", "--seq-len", "32", "--calib-chat", str(chat)]
    capsys.readouterr()
    assert cli.main(args + ["--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no chat template" in err
    assert cli.main(args + ["--calib", "c4", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not both" in err
    assert not (tmp_path / "q").exists()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_quantize_head_streamed_with_rtn(tmp_path, capsys):
    """--quantize-head while blocks stream from disk (RTN: no calibration needed): the
    tied head becomes its own packed layer, counted in the summary, and the checkpoint
    equals the one made from the whole model (--no-stream)."""
    pytest.importorskip("transformers")
    from hf_tiny import save_sharded_llama
    from kvant.nn.qlinear import QuantLinear

    src = save_sharded_llama(tmp_path / "m", layers=2)
    base = ["quantize", str(src), "--method", "rtn", "--group-size", "32", "--quantize-head"]
    assert cli.main(base + ["--out", str(tmp_path / "s"), "--json"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert not (tmp_path / ".s.partial").exists()
    assert cli.main(base + ["--no-stream", "--out", str(tmp_path / "w"), "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    for res in (streamed, whole):  # 2 blocks x 7 Linears + the head
        assert res["summary"]["quantized_layers"] == 15 and res["summary"]["head_quantized"]
    meta = _meta(tmp_path / "s")
    assert "lm_head" in meta["quantization_config"]["modules"] and "lm_head" in \
        meta["layer_losses"] and meta["quantization_config"]["quantize_head"] is True
    a, _ = kvant.load_quantized(tmp_path / "s")
    b, _ = kvant.load_quantized(tmp_path / "w")
    assert isinstance(a.lm_head, QuantLinear)
    assert not isinstance(a.get_input_embeddings(), QuantLinear)  # the embedding: float
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    assert streamed["summary"]["bits_per_weight"] == pytest.approx(
        whole["summary"]["bits_per_weight"])


def test_quantize_head_streamed_calibrated_is_refused(tmp_path, capsys):
    """A calibrated head needs the whole model (kvant.calib.head): refused with one line
    that names --no-stream, and nothing is written."""
    pytest.importorskip("transformers")
    from hf_tiny import save_sharded_llama, text_sample

    src = save_sharded_llama(tmp_path / "m", layers=2)
    (tmp_path / "c.txt").write_text(text_sample(4000))
    capsys.readouterr()
    rc = cli.main(["quantize", str(src), "--method", "gptq", "--group-size", "32",
                   "--n-samples", "2", "--seq-len", "32", "--calib", str(tmp_path / "c.txt"),
                   "--quantize-head", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--no-stream" in err and "--quantize-head" in err
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.partial").exists()


def _tiny_mixtral(path: Path) -> Path:
    """A tiny random Mixtral (hidden 64, 4 experts, top-2, 2 blocks, vocab 300) with the
    tiny tokenizer, saved to ``path``."""
    import transformers
    from hf_tiny import tiny_tokenizer

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=128,
                                     num_local_experts=4, num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_moe_quantize_and_inspect_through_the_cli(tmp_path, capsys):
    """kvant quantize on a Mixtral directory (streaming is the default: the CLI loads the
    stacked experts whole instead), then kvant inspect: every expert packed, routers float,
    the checkpoint equal to the API's result."""
    pytest.importorskip("transformers")
    from hf_tiny import text_sample

    src = _tiny_mixtral(tmp_path / "mix")
    (tmp_path / "c.txt").write_text(text_sample(6000))
    capsys.readouterr()
    assert cli.main(["quantize", str(src), "--method", "gptq", "--group-size", "32",
                     "--n-samples", "8", "--seq-len", "32", "--calib", str(tmp_path / "c.txt"),
                     "--out", str(tmp_path / "q")]) == 0
    cap = capsys.readouterr()
    assert "stacked 3-D weights" in cap.err and "loading it whole" in cap.err
    # per block: q, k, v, o + gate_up and down of each of the 4 experts
    assert cap.out.startswith("quantized 24 layers with gptq")
    assert "experts: 16 expert layers" in cap.out and "0 of them got fewer" in cap.out
    assert not (tmp_path / ".q.partial").exists()
    modules = _meta(tmp_path / "q")["quantization_config"]["modules"]
    experts = {f"model.layers.{b}.mlp.experts.{p}.{e}" for b in range(2)
               for p in ("gate_up_proj", "down_proj") for e in range(4)}
    assert experts <= set(modules) and len(modules) == 24
    assert not any(n.endswith("mlp.gate") for n in modules)  # the routers stay float
    assert cli.main(["inspect", str(tmp_path / "q"), "--layers"]) == 0
    text = capsys.readouterr().out
    assert "method gptq, 4-bit, group g32: 24 quantized layers" in text
    assert "model.layers.1.mlp.experts.down_proj.3: quant" in text
    # the CLI's checkpoint is what the API makes from the same windows
    model, tok = kvant.load_model(src)
    calib = kvant.calibration_for(model, tok, str(tmp_path / "c.txt"), n_samples=8, seq_len=32)
    kvant.quantize(model, kvant.GPTQConfig(group_size=32), calib,
                   kvant.EngineOptions(device="cpu", show_progress=False))
    loaded, _ = kvant.load_quantized(tmp_path / "q")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-5)
