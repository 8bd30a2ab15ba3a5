"""Calibration token windows from text: files, JSONL (C4 style), lists, HF datasets, names.

GPTQ's protocol: ``n_samples`` random windows of ``seq_len`` tokens, seeded. Here every
document is tokenized (no special tokens), the documents are joined into one token stream
with the tokenizer's end-of-sequence token between them (so short documents are concatenated
and long ones may give several windows), and the windows are drawn from that stream:
non-overlapping windows in random order when the stream holds at least ``n_samples`` of
them, otherwise random (possibly overlapping) start positions. The same seed gives the same
windows on every machine.

Names: ``"c4"`` and ``"wikitext2"`` resolve to the user's local copy (``calib_file``) or,
without one, to the Hugging Face hub through the optional ``datasets`` package.
Works with Hugging Face tokenizers and with kvant's ``CharTokenizer`` (``encode``/``decode``).

Chat data (:func:`chat_calibration_data`): a JSONL file of ``{"messages": [...]}``
conversations, each rendered with the tokenizer's chat template, then packed the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from kvant.errors import InputError

NAMED_SOURCES = ("c4", "wikitext2")
# where the named sets live on the hub (used only when no local file is given)
_HUB = {
    "c4": dict(path="allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
               split="train"),
    "wikitext2": dict(path="wikitext", name="wikitext-2-raw-v1", split="train"),
}


class CalibrationDataError(InputError):
    """Calibration or evaluation text is missing, unreadable or too short."""


def encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text`` with a HF tokenizer or a kvant ``CharTokenizer``.

    HF tokenizers warn when a text exceeds their model_max_length; that is expected here
    (long texts are cut into windows afterwards), so the warning is switched off.
    """
    if hasattr(tokenizer, "__call__") and hasattr(tokenizer, "pad_token_id"):
        return list(tokenizer(text, add_special_tokens=add_special_tokens,
                              verbose=False)["input_ids"])
    return list(tokenizer.encode(text))


def separator_ids(tokenizer) -> list[int]:
    """Tokens placed between documents: the EOS token, else an encoded blank line."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        return [eos]
    try:
        return encode(tokenizer, "\n\n")
    except ValueError:  # a character vocabulary without newlines
        return []


def wikitext_rows(path: str | os.PathLike) -> list[str]:
    """Rows of a raw WikiText file: each line of the file, newline kept, is one row.

    The papers' protocol joins these rows with ``"\\n\\n"``. Blank lines (" \\n" in the raw
    file) are kept as they are; this gives the 149 windows of 2048 SmolLM2 tokens that the
    reference numbers quoted in the Llama-track issue were measured on (Hugging Face's
    builder turns blank lines into "" and gives 148 windows; the perplexity agrees to 4
    digits either way).
    """
    text = Path(path).read_text(encoding="utf-8")
    return text.splitlines(keepends=True)


def json_lines(path: str | os.PathLike):
    """(line number, parsed object) for every non-blank line of a JSONL file; a line that is
    not JSON raises :class:`CalibrationDataError` naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationDataError(f"{path}:{i} is not valid JSON: {e}") from None


def read_jsonl(path: str | os.PathLike, field: str = "text") -> list[str]:
    """The ``field`` of every JSON line of ``path`` (C4's layout: text, timestamp, url)."""
    docs = []
    for i, row in json_lines(path):
        if not isinstance(row, dict) or field not in row:
            raise CalibrationDataError(f"{path}:{i} has no {field!r} field")
        docs.append(str(row[field]))
    return docs


def _hub_documents(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CalibrationDataError(
            f"calibration source {name!r} needs a local copy (calib_file=..., CLI "
            f"--calib-file) or the `datasets` package to download it from the hub, which is "
            f"not installed: pip install 'kvant[hf]'") from None
    spec = dict(_HUB[name])
    try:
        ds = datasets.load_dataset(**spec)
    except Exception as e:  # network errors come in many types
        raise CalibrationDataError(
            f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); offline? pass a local copy with "
            "calib_file=... (CLI --calib-file)") from None
    return dataset_texts(ds)


def dataset_texts(ds) -> list[str]:
    """The ``text`` column of a Hugging Face dataset (duck-typed: no import of datasets)."""
    cols = getattr(ds, "column_names", None)
    if cols is not None and "text" not in cols:
        raise CalibrationDataError(f"dataset has no 'text' column (columns: {cols})")
    return [str(t) for t in ds["text"]]


def _is_dataset(obj) -> bool:
    return hasattr(obj, "column_names") and hasattr(obj, "__getitem__")


def load_documents(source, calib_file: str | os.PathLike | None = None) -> list[str]:
    """Documents of a calibration ``source`` (see :func:`calibration_data`)."""
    if _is_dataset(source):
        return dataset_texts(source)
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise CalibrationDataError("a calibration list must hold strings only")
        return list(source)
    if not isinstance(source, (str, os.PathLike)):
        raise CalibrationDataError(f"unknown calibration source of type {type(source).__name__}: "
                                   "expected a file path, 'c4', 'wikitext2', a list of strings "
                                   "or a Hugging Face dataset")
    name = str(source)
    if name in NAMED_SOURCES:
        if calib_file is None:
            return _hub_documents(name)
        if name == "wikitext2":
            return ["\n\n".join(wikitext_rows(calib_file))]
        return load_documents(calib_file)
    path = Path(name)
    if not path.is_file():
        raise CalibrationDataError(f"calibration source {name!r} is neither a file nor one of "
                                   f"{list(NAMED_SOURCES)}")
    if path.suffix.lower() in (".jsonl", ".json"):
        return read_jsonl(path)
    return [path.read_text(encoding="utf-8")]


def token_stream(tokenizer, docs: Iterable[str], show_progress: bool = True) -> torch.Tensor:
    """All documents tokenized and joined by the separator -> 1-D LongTensor.
    ``show_progress``: a tqdm bar on stderr when it is a terminal (a C4 shard holds some
    350,000 documents: minutes of tokenizing)."""
    from tqdm.auto import tqdm

    sep = separator_ids(tokenizer)
    ids: list[int] = []
    for doc in tqdm(docs, desc="tokenizing calibration text", unit="doc", leave=False,
                    disable=None if show_progress else True):
        if not doc:
            continue
        if ids:
            ids.extend(sep)
        ids.extend(encode(tokenizer, doc))
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0,
                   what: str = "calibration text") -> torch.Tensor:
    """``n_samples`` seeded windows (n_samples, seq_len) of a 1-D token ``stream``."""
    check_counts(n_samples, seq_len)
    from kvant.calib.budget import check_host_bytes

    check_host_bytes(n_samples * seq_len * 8, f"{n_samples} calibration windows of "
                     f"{seq_len} token ids")
    n_tok = stream.numel()
    if n_tok < seq_len:
        raise CalibrationDataError(f"{what} has {n_tok} tokens, fewer than one window of "
                                   f"seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    n_chunks = n_tok // seq_len
    if n_chunks >= n_samples:
        # distinct, non-overlapping windows at a random offset, in random order
        offset = int(torch.randint(0, n_tok - n_chunks * seq_len + 1, (1,), generator=g))
        chunks = torch.randperm(n_chunks, generator=g)[:n_samples]
        starts = offset + chunks * seq_len
    else:
        starts = torch.randint(0, n_tok - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def calibration_data(tokenizer, source="c4", n_samples: int = 128, seq_len: int = 2048,
                     seed: int = 0, calib_file: str | os.PathLike | None = None) -> torch.Tensor:
    """Calibration token ids (n_samples, seq_len), seeded.

    source: a text file, a ``.jsonl`` file with a ``text`` field (C4 style), a list of
    strings, a Hugging Face dataset with a ``text`` column, or ``"c4"`` / ``"wikitext2"``
    (read from ``calib_file`` when given, else from the hub via ``datasets``).
    Raises :class:`CalibrationDataError` when the text is shorter than one window.
    """
    docs = load_documents(source, calib_file)
    label = f"calibration source {str(calib_file or source)[:80]!r}" if isinstance(
        source, (str, os.PathLike)) else "calibration text"
    if not any(docs):
        raise CalibrationDataError(f"{label} is empty")
    return sample_windows(token_stream(tokenizer, docs), n_samples, seq_len, seed, label)


DEFAULT_SEQ_LEN = 2048


def default_seq_len(model) -> int:
    """The window length used when none is given: 2048 tokens, or the model's context
    length when that is shorter (a 512-token model calibrates on 512-token windows)."""
    ctx = context_length(model)
    return min(DEFAULT_SEQ_LEN, ctx) if ctx else DEFAULT_SEQ_LEN


def resolve_seq_len(model, seq_len: int | None) -> int:
    """``seq_len``, or :func:`default_seq_len` when it is None; checked against the model's
    context (:func:`check_seq_len`). Every caller that sizes calibration (the windows, the
    memory estimate of kvant.calib.budget) goes through this one rule."""
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    check_seq_len(model, seq_len)
    return seq_len


def read_chat_jsonl(path: str | os.PathLike) -> list[tuple[int, list[dict]]]:
    """Conversations of a chat JSONL file: one ``{"messages": [{"role": ..., "content":
    ...}, ...]}`` object per line (blank lines skipped) -> [(line number, messages)].
    A malformed line raises :class:`CalibrationDataError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"chat calibration file {str(path)!r} does not exist")
    chats = []
    for i, row in json_lines(path):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise CalibrationDataError(f"{path}:{i} has no 'messages' list (expected "
                                       '{"messages": [{"role": ..., "content": ...}]})')
        for j, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise CalibrationDataError(f"{path}:{i}: message {j} is not an object "
                                           "with string 'role' and 'content'")
        chats.append((i, msgs))
    if not chats:
        raise CalibrationDataError(f"chat calibration file {str(path)!r} holds no conversation")
    return chats


def render_chats(tokenizer, chats: list[tuple[int, list[dict]]], where: str = "chat") -> list[str]:
    """Each conversation as text through the tokenizer's chat template
    (``apply_chat_template(messages, tokenize=False)``), ready for :func:`token_stream`.
    A tokenizer without a chat template, or a template that rejects a conversation, raises
    :class:`CalibrationDataError` (the latter naming the line)."""
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer,
                                                                    "apply_chat_template"):
        raise CalibrationDataError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template, so chat data "
            "cannot be rendered as the model would see it; calibrate on plain text (--calib) "
            "or use the instruct model's tokenizer")
    texts = []
    for line, msgs in chats:
        try:
            texts.append(str(tokenizer.apply_chat_template(msgs, tokenize=False)))
        except Exception as e:  # jinja raises its own types (e.g. roles must alternate)
            raise CalibrationDataError(f"{where}:{line}: the chat template rejects this "
                                       f"conversation ({type(e).__name__}: {e})") from None
    return texts


def chat_calibration_data(tokenizer, path: str | os.PathLike, n_samples: int = 128,
                          seq_len: int = 2048, seed: int = 0) -> torch.Tensor:
    """Calibration token ids (n_samples, seq_len) from chat data, seeded.

    ``path``: a JSONL file with one ``{"messages": [...]}`` conversation per line
    (:func:`read_chat_jsonl`). Each conversation is rendered with the tokenizer's chat
    template (:func:`render_chats`), so the model is calibrated on the role markers and
    special tokens it sees when chatting; the rendered conversations are packed into one
    token stream (end-of-sequence token between them) and cut into windows exactly as
    :func:`calibration_data` does.
    """
    check_counts(n_samples, seq_len)
    docs = render_chats(tokenizer, read_chat_jsonl(path), str(path))
    return sample_windows(token_stream(tokenizer, docs), n_samples, seq_len, seed,
                          f"chat calibration file {str(path)[:80]!r}")


def context_length(model) -> int | None:
    """The longest sequence ``model`` accepts, where its config says (else None)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length",
                "seq_length", "block_size"):
        val = getattr(cfg, key, None)
        if isinstance(val, int) and val > 0:
            return val
    return None


def check_seq_len(model, seq_len: int, what: str = "seq_len") -> None:
    """Raise before any work when ``seq_len`` exceeds the model's context length."""
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise CalibrationDataError(f"{what} must be a positive int, got {seq_len!r}")
    ctx = context_length(model)
    if ctx is not None and seq_len > ctx:
        raise CalibrationDataError(f"{what} {seq_len} exceeds the model's context length {ctx} "
                                   f"({type(model).__name__}); use --seq-len {ctx} or less")


def _positive_int(value, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CalibrationDataError(f"{what} must be a positive int, got {value!r}")


def check_counts(n_samples, seq_len) -> None:
    """Raise unless ``n_samples`` and ``seq_len`` are positive ints (a zero or negative one
    would give no windows, or windows that silently degrade a method to plain rounding)."""
    _positive_int(n_samples, "n_samples")
    _positive_int(seq_len, "seq_len")


def vocab_size(model) -> int | None:
    """Rows of the model's input embedding (the ids it accepts), where it can be found."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    n = getattr(emb, "num_embeddings", None)
    return n if isinstance(n, int) else getattr(getattr(model, "config", None), "vocab_size", None)


def check_token_ids(model, ids, what: str = "calibration data") -> None:
    """Raise :class:`CalibrationDataError` unless ``ids`` is an integer tensor
    (n_samples, seq_len) of token ids the model accepts: inside its vocabulary and no longer
    than its context. Catches what would otherwise fail deep inside the embedding."""
    if not torch.is_tensor(ids):
        raise CalibrationDataError(f"{what} must be a tensor of token ids (n_samples, seq_len), "
                                   f"got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise CalibrationDataError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise CalibrationDataError(f"{what} must be 2-D (n_samples, seq_len), got shape "
                                   f"{tuple(ids.shape)}")
    if ids.numel() == 0:
        raise CalibrationDataError(f"{what} is empty (shape {tuple(ids.shape)})")
    n = vocab_size(model)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (n is not None and hi >= n):
        bad = lo if lo < 0 else hi
        raise CalibrationDataError(f"{what} holds token id {bad}, outside the model's "
                                   f"vocabulary [0, {n}): wrong tokenizer for this model?")
    check_seq_len(model, ids.shape[1], f"{what} seq_len")
