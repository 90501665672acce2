"""Page sources: the shared corpus, and pages sampled from /usr and a child's memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmem import corpus
from tmem.errors import ConfigError

PAGE = 4096


def test_split_pages_pads_last() -> None:
    pages = corpus.split_pages(b"a" * PAGE + b"b" * 10)
    assert [len(p) for p in pages] == [PAGE, PAGE]
    assert pages[1] == b"b" * 10 + bytes(PAGE - 10)


def test_no_corpus_env_disables_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMEM_NO_CORPUS", "1")
    assert corpus.find_corpus_dir() is None
    assert corpus.describe_source("anon").startswith("sampled")


def test_corpus_env_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "anon.pages").write_bytes(b"\1" * PAGE * 3)
    monkeypatch.delenv("TMEM_NO_CORPUS", raising=False)
    monkeypatch.setenv("TMEM_CORPUS", str(tmp_path))
    assert corpus.find_corpus_dir() == tmp_path
    assert corpus.load_pages("anon") == [b"\1" * PAGE] * 3


def test_sample_file_pages(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a").write_bytes(b"A" * (PAGE + 100))
    (tmp_path / "sub" / "b").write_bytes(b"B" * 50)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    pages = corpus.sample_file_pages(30, roots=[str(tmp_path)], seed=1)
    assert len(pages) == 30 and all(len(p) == PAGE for p in pages)
    allowed = {b"A" * PAGE, b"A" * 100 + bytes(PAGE - 100), b"B" * 50 + bytes(PAGE - 50)}
    assert set(pages) <= allowed
    assert b"A" * PAGE in pages  # uniform over pages: the 2-page file is picked most


def test_sample_file_pages_from_usr() -> None:
    pages = corpus.sample_file_pages(64, seed=3)
    assert len(pages) == 64 and all(len(p) == PAGE for p in pages)
    assert len(set(pages)) > 32  # real, varied file data


def test_sample_file_pages_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        corpus.sample_file_pages(4, roots=[str(tmp_path)])


def test_sample_anon_pages_are_real_memory() -> None:
    pages = corpus.sample_anon_pages(1024, seed=2)
    assert len(pages) == 1024 and all(len(p) == PAGE for p in pages)
    nonzero = [p for p in pages if any(p)]
    assert len(nonzero) > 800
    assert len(set(nonzero)) > 800
    # The child built record dicts: their strings show up in its heap.
    assert any(b"user0" in p for p in pages)


def test_load_pages_dir_and_file(tmp_path: Path) -> None:
    (tmp_path / "x.pages").write_bytes(b"\2" * PAGE * 2)
    assert corpus.load_pages(str(tmp_path)) == [b"\2" * PAGE] * 2
    assert corpus.load_pages(str(tmp_path / "x.pages")) == [b"\2" * PAGE] * 2
    with pytest.raises(ConfigError):
        corpus.load_pages(str(tmp_path / "missing"))
