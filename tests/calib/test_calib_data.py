"""Calibration windows: sources, GPTQ's seeded protocol, both tokenizer kinds, bad input."""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from kvant.calib.data import (CalibrationDataError, calibration_data, check_seq_len,
                              context_length, sample_windows, token_stream, wikitext_rows)
from kvant.model.nanogpt import CharTokenizer

CHARS = CharTokenizer("".join(chr(c) for c in range(32, 127)) + "\n")
TEXT = "".join(chr(32 + (i * 7) % 95) for i in range(5000))


def _is_window_of(stream: torch.Tensor, w: torch.Tensor) -> bool:
    s = stream.tolist()
    w = w.tolist()
    return any(s[i:i + len(w)] == w for i in range(len(s) - len(w) + 1))


def test_seeded_and_reproducible():
    a = calibration_data(CHARS, [TEXT], n_samples=8, seq_len=64, seed=0)
    b = calibration_data(CHARS, [TEXT], n_samples=8, seq_len=64, seed=0)
    c = calibration_data(CHARS, [TEXT], n_samples=8, seq_len=64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = torch.tensor(CHARS.encode(TEXT))
    assert all(_is_window_of(stream, w) for w in a)


def test_enough_text_gives_distinct_non_overlapping_windows():
    stream = torch.arange(1000)
    w = sample_windows(stream, 10, 64, seed=3)  # 15 chunks available
    starts = sorted(int(r[0]) for r in w)
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))
    assert all(torch.equal(r, torch.arange(r[0], r[0] + 64)) for r in w)
    # fewer chunks than samples: random, possibly overlapping starts, still valid windows
    w = sample_windows(stream[:100], 5, 64, seed=0)
    assert w.shape == (5, 64) and all(torch.equal(r, torch.arange(r[0], r[0] + 64)) for r in w)


def test_short_documents_are_joined_with_eos():
    from hf_tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    stream = token_stream(tok, ["first doc", "", "second doc"])
    eos = tok.eos_token_id
    assert stream.tolist() == (tok("first doc", add_special_tokens=False)["input_ids"] + [eos]
                               + tok("second doc", add_special_tokens=False)["input_ids"])
    w = calibration_data(tok, ["short doc number %d." % i for i in range(200)], 4, 32)
    assert w.shape == (4, 32) and (w == eos).any()


def test_file_jsonl_named_and_dataset_sources(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text(TEXT)
    jl = tmp_path / "c4.jsonl"
    jl.write_text("\n".join(json.dumps({"text": TEXT[i:i + 500], "url": "u"})
                            for i in range(0, 5000, 500)) + "\n")
    from_txt = calibration_data(CHARS, str(txt), 4, 32)
    assert torch.equal(from_txt, calibration_data(CHARS, [TEXT], 4, 32))
    assert calibration_data(CHARS, str(jl), 4, 32).shape == (4, 32)
    assert torch.equal(calibration_data(CHARS, "c4", 4, 32, calib_file=jl),
                       calibration_data(CHARS, str(jl), 4, 32))

    class FakeDataset:  # duck-typed Hugging Face dataset
        column_names = ["text", "url"]

        def __getitem__(self, key):
            return [TEXT[:2500], TEXT[2500:]] if key == "text" else None

    assert calibration_data(CHARS, FakeDataset(), 4, 32).shape == (4, 32)


def test_wikitext_rows_are_the_raw_lines(tmp_path):
    f = tmp_path / "wiki.raw"
    f.write_text(" \n = Title = \n \n Some text .\n")
    assert wikitext_rows(f) == [" \n", " = Title = \n", " \n", " Some text .\n"]
    w = calibration_data(CHARS, "wikitext2", 1, 8, calib_file=f)
    assert CHARS.decode(w[0]) in "\n\n".join(wikitext_rows(f))


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationDataError, match="fewer than one window of seq_len=64"):
        calibration_data(CHARS, ["too short"], 4, 64)
    with pytest.raises(CalibrationDataError, match="neither a file nor one of"):
        calibration_data(CHARS, "no/such/file.txt", 4, 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(CalibrationDataError, match="has no 'text' field"):
        calibration_data(CHARS, bad, 4, 64)
    with pytest.raises(CalibrationDataError, match="list must hold strings"):
        calibration_data(CHARS, ["ok", 3], 4, 64)
    with pytest.raises(CalibrationDataError, match="is empty"):
        calibration_data(CHARS, [""], 4, 64)
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        calibration_data(CHARS, ["\u00e9" * 100], 1, 8)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None,
                    reason="datasets installed: the hub path would be tried")
def test_named_source_without_local_copy_or_datasets():
    with pytest.raises(CalibrationDataError, match="calib_file=.*datasets"):
        calibration_data(CHARS, "c4", 4, 64)


def test_seq_len_above_context_is_an_error():
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=128))
    assert context_length(model) == 128
    check_seq_len(model, 128)
    with pytest.raises(CalibrationDataError, match="seq_len 256 exceeds the model's context "
                                                   "length 128"):
        check_seq_len(model, 256)
    gpt2_like = SimpleNamespace(config=SimpleNamespace(n_positions=64))
    with pytest.raises(CalibrationDataError, match="context length 64"):
        check_seq_len(gpt2_like, 65)
    check_seq_len(SimpleNamespace(), 10 ** 6)  # unknown context: no check
