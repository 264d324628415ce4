"""Text sources, disjoint splits, seeded calibration sampling."""

import pytest
import torch

from ptqbench import data
from ptqbench.errors import ConfigError


@pytest.mark.parametrize("name", ["code", "docs", "prose"])
def test_splits_are_disjoint_and_deterministic(name):
    calib, ev = data.documents(name, "calib"), data.documents(name, "eval")
    assert len(calib) > 20 and len(ev) > 5
    assert not set(calib) & set(ev)
    data.documents.cache_clear()
    assert data.documents(name, "eval") == ev


def test_prose_excludes_offensive_files():
    folder = data.fortune_dir()
    offensive = (folder / "fortunes-o").read_text(encoding="latin-1").split("\n%\n")[5].strip("%\n")
    docs = set(data.documents("prose", "calib")) | set(data.documents("prose", "eval"))
    assert offensive and offensive not in docs


def test_mixture_allocation():
    spec = data.CalibSpec("mix", (("docs", 1.0), ("code", 1.0), ("prose", 1.0)), n_samples=32, seq_len=64)
    assert spec.allocation() == [("docs", 11), ("code", 11), ("prose", 10)]
    assert sum(n for _, n in data.CalibSpec("w", (("docs", 3), ("code", 1)), 10, 64).allocation()) == 10


def test_bad_calib_and_source():
    with pytest.raises(ConfigError, match="unknown text source"):
        data.CalibSpec("x", (("nope", 1.0),), 4, 64)
    with pytest.raises(ConfigError):
        data.CalibSpec("x", (("docs", 0.0),), 4, 64)


@pytest.mark.slow
def test_calibration_seeded_and_fingerprinted(smol):
    spec = data.CalibSpec("docs", (("docs", 1.0),), n_samples=4, seq_len=64)
    a = data.draw_calibration(spec, 0, smol.tokenizer, smol.tokenizer_id)
    b = data.draw_calibration(spec, 0, smol.tokenizer, smol.tokenizer_id)
    c = data.draw_calibration(spec, 1, smol.tokenizer, smol.tokenizer_id)
    assert a.input_ids.shape == (4, 64)
    assert a.fingerprint == b.fingerprint and (a.input_ids == b.input_ids).all()
    assert a.fingerprint != c.fingerprint
    # every window is a contiguous slice of the calibration split's token stream (never of the eval split's)
    calib = data.tokens("docs", "calib", smol.tokenizer, smol.tokenizer_id)
    for row in a.input_ids:
        starts = (calib[: -64] == row[0]).nonzero().flatten()
        assert any(torch.equal(calib[s: s + 64], row) for s in starts.tolist())


@pytest.mark.slow
def test_eval_windows_protocol(smol):
    es = data.eval_set("docs", 128, 3, smol.tokenizer, smol.tokenizer_id)
    assert es.windows.shape == (3, 128)
    assert "seq_len=128" in es.protocol and "windows=3/" in es.protocol and "tokens=384" in es.protocol
