"""A GPU kernel computes a kind of call only after it matched its reference once
(kvant.kernels.selfcheck); a kernel that disagrees is never used. Checked on the CPU with
stand-in kernels, for the check itself and for the QuIP# layer that relies on it."""

import logging

import pytest
import torch

from kvant.kernels import codebook as cbk
from kvant.kernels import selfcheck

from test_codebook import _layer


@pytest.fixture(autouse=True)
def fresh():
    selfcheck.forget()
    yield
    selfcheck.forget()


def test_agreeing_kernel_is_trusted_once_and_remembered():
    calls = []
    x = torch.randn(5, 7)

    def kernel():
        calls.append(1)
        return x * (1 + 1e-4)

    assert selfcheck.trusted(("k",), kernel, lambda: x, 1e-3)
    assert selfcheck.trusted(("k",), kernel, lambda: x, 1e-3)
    assert len(calls) == 1 and selfcheck.verdict(("k",)) is True


@pytest.mark.parametrize("wrong", ["scaled", "nan", "shape"])
def test_disagreeing_kernel_is_refused_with_a_warning(wrong, caplog):
    x = torch.randn(5, 7)
    bad = {"scaled": lambda: 1.1 * x, "nan": lambda: x.clone().fill_(float("nan")),
           "shape": lambda: x[:4]}[wrong]
    with caplog.at_level(logging.WARNING, logger="kvant.kernels.selfcheck"):
        assert not selfcheck.trusted(("k", wrong), bad, lambda: x, 2e-2)
    assert "disagrees with its reference" in caplog.text
    assert selfcheck.verdict(("k", wrong)) is False


def test_no_check_where_none_can_run(monkeypatch):
    monkeypatch.setattr(selfcheck, "can_check", lambda: False)
    x = torch.randn(3)
    assert not selfcheck.trusted(("k",), lambda: x, lambda: x, 1e-3)
    assert selfcheck.verdict(("k",)) is None  # asked again where a check can run


@pytest.mark.parametrize("broken", [False, True])
def test_quipsharp_layer_uses_the_kernel_only_once_it_matched(monkeypatch, broken):
    m = _layer(2)
    x = torch.randn(1, 64)
    ref = m.reference_product(x)
    calls = []

    def fake_kernel(x, *args):  # stands in for the CUDA kernel on this CPU
        calls.append(1)
        y = m.reference_product(x)
        return 3 * y if broken else y

    monkeypatch.setattr(cbk, "kernel_applies", lambda x: True)
    monkeypatch.setattr(cbk, "e8p_linear", fake_kernel)
    for _ in range(3):
        assert torch.equal(m._product(x), ref)
    # a trusted kernel computes every call (1 check + 3 calls); a broken one only the check
    assert len(calls) == (1 if broken else 4)
