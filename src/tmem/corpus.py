"""Real 4 KiB pages for benchmarks: the shared corpus, or pages sampled on the spot.

Benchmarks on synthetic data lie (random bytes do not compress, repeated text
compresses too well), so every source here is real memory:

* the project's corpus (``../shared/corpus/{anon,file}.pages`` next to the project,
  or ``$TMEM_CORPUS``), ignored when ``TMEM_NO_CORPUS`` is set;
* file pages: pages of regular files under /usr/bin, /usr/lib and /usr/share,
  chosen uniformly over all pages, the last page of a file zero-padded as in the
  page cache (what cleancache sees);
* anonymous pages: a child python process builds real data (parsed sources,
  dicts, JSON, floats, a sqlite table), then its private writable anonymous
  mappings are read through ``/proc/PID/mem``, keeping only pages that
  ``/proc/PID/pagemap`` reports present (what frontswap sees). Needs permission to
  read another process's memory (root, or ptrace scope 0 for a child).
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tmem.compress import PAGE_SIZE
from tmem.errors import ConfigError

CORPUS_KINDS = ("anon", "file", "sample")
_USR_DIRS = ("/usr/bin", "/usr/lib", "/usr/share")
_PAGEMAP_PRESENT = 1 << 63


def find_corpus_dir() -> Path | None:
    """Locate the shared corpus, or None if absent or disabled by ``TMEM_NO_CORPUS``.

    Looked for in ``$TMEM_CORPUS``, then in ``shared/corpus`` beside the project
    root and beside each of its parents (so git worktrees nested one level deeper
    find it too).
    """
    if os.environ.get("TMEM_NO_CORPUS"):
        return None
    env = os.environ.get("TMEM_CORPUS")
    if env:
        path = Path(env)
        return path if path.is_dir() else None
    root = Path(__file__).resolve().parents[2]  # src/tmem/corpus.py -> project root
    for base in (root.parent, *root.parent.parents):
        candidate = base / "shared" / "corpus"
        if (candidate / "anon.pages").is_file() or (candidate / "file.pages").is_file():
            return candidate
    return None


def split_pages(blob: bytes) -> list[bytes]:
    """Cut raw bytes into PAGE_SIZE pages, zero-padding the last one."""
    pages = [blob[i : i + PAGE_SIZE] for i in range(0, len(blob), PAGE_SIZE)]
    if pages and len(pages[-1]) < PAGE_SIZE:
        pages[-1] = pages[-1].ljust(PAGE_SIZE, b"\0")
    return pages


def _walk_files(roots: Sequence[str]) -> Iterator[tuple[str, int]]:
    """(path, size) of every non-empty regular file under ``roots``, no symlinks."""
    stack = list(roots)
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    size = entry.stat(follow_symlinks=False).st_size
                    if size > 0:
                        yield entry.path, size
            except OSError:
                continue


def sample_file_pages(n: int, *, roots: Sequence[str] = _USR_DIRS, seed: int = 0) -> list[bytes]:
    """``n`` pages drawn uniformly over all pages of the regular files under ``roots``."""
    files = sorted(_walk_files(roots))
    if not files:
        raise ConfigError(f"no readable files under {', '.join(roots)}")
    rng = random.Random(seed)
    weights = [(size + PAGE_SIZE - 1) // PAGE_SIZE for _, size in files]
    picks = rng.choices(range(len(files)), weights=weights, k=n * 2)
    pages: list[bytes] = []
    for i in picks:
        if len(pages) >= n:
            break
        path, _size = files[i]
        page_no = rng.randrange(weights[i])
        try:
            with open(path, "rb") as f:
                f.seek(page_no * PAGE_SIZE)
                data = f.read(PAGE_SIZE)
        except OSError:
            continue
        if data:
            pages.append(data.ljust(PAGE_SIZE, b"\0"))
    if not pages:
        raise ConfigError(f"could not read any file page under {', '.join(roots)}")
    while len(pages) < n:  # unreadable picks: reuse what we have
        pages.append(pages[len(pages) % max(1, len(pages))])
    return pages


# The child builds the kinds of data real programs hold, then waits for us.
_CHILD = r"""
import ast, json, os, random, sqlite3, sys, sysconfig
rng = random.Random(12345)
keep = []
stdlib = sysconfig.get_paths()["stdlib"]
sources = []
for name in sorted(os.listdir(stdlib))[:80]:
    if name.endswith(".py"):
        try:
            with open(os.path.join(stdlib, name), encoding="utf-8") as f:
                sources.append(f.read())
        except (OSError, UnicodeDecodeError):
            pass
keep.append(sources)
trees = []
for src in sources[:25]:
    try:
        trees.append(ast.parse(src))
    except SyntaxError:
        pass
keep.append(trees)
words = {}
for src in sources:
    for w in src.split():
        words[w] = words.get(w, 0) + 1
keep.append(words)
vocab = sorted(words)[:500]
records = [{"id": i, "name": "user%05d" % i, "score": rng.random() * 100,
            "tags": rng.sample(vocab, 3)} for i in range(20000)]
keep.append(records)
keep.append(json.dumps(records[:4000]))
keep.append([rng.gauss(0, 1) for _ in range(150000)])
db = sqlite3.connect(":memory:")
db.execute("create table t (id integer primary key, name text, score real)")
db.executemany("insert into t values (?, ?, ?)",
               [(r["id"], r["name"], r["score"]) for r in records])
db.commit()
keep.append(db)
keep.append(bytearray(os.urandom(1 << 16)))
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
"""


def _anon_ranges(pid: int) -> list[tuple[int, int]]:
    """Private writable mappings with no backing file (heap, stack, anon mmaps)."""
    ranges = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            perms = fields[1]
            name = fields[5] if len(fields) > 5 else ""
            if not perms.startswith("rw") or perms[3] != "p":
                continue
            if name and name not in ("[heap]", "[stack]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _present_pages(pid: int, ranges: list[tuple[int, int]]) -> list[int]:
    """Addresses of pages in ``ranges`` that are resident (pagemap bit 63)."""
    present = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for start, end in ranges:
            npages = (end - start) // PAGE_SIZE
            pm.seek((start // PAGE_SIZE) * 8)
            raw = pm.read(npages * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", raw)):
                if entry & _PAGEMAP_PRESENT:
                    present.append(start + i * PAGE_SIZE)
    return present


def sample_anon_pages(n: int, *, seed: int = 0) -> list[bytes]:
    """``n`` resident anonymous pages of a freshly spawned python child that built data."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"ready":
            raise ConfigError("anonymous-memory sampler: child process failed to start")
        ranges = _anon_ranges(child.pid)
        addrs = _present_pages(child.pid, ranges)
        if not addrs:
            raise ConfigError("anonymous-memory sampler: no resident anonymous pages")
        rng = random.Random(seed)
        chosen = sorted(rng.sample(addrs, min(n, len(addrs))))
        pages = []
        with open(f"/proc/{child.pid}/mem", "rb", buffering=0) as mem:
            for addr in chosen:
                try:
                    mem.seek(addr)
                    data = mem.read(PAGE_SIZE)
                except OSError:
                    continue
                if len(data) == PAGE_SIZE:
                    pages.append(data)
    except PermissionError as exc:
        raise ConfigError(
            f"cannot read a child's memory ({exc}); run as root or use --corpus file"
        ) from exc
    finally:
        child.kill()
        child.wait()
    if not pages:
        raise ConfigError("anonymous-memory sampler: could not read any page")
    rng.shuffle(pages)
    return pages


def load_pages(source: str, *, sample_pages: int = 2048, seed: int = 0) -> list[bytes]:
    """Pages for ``source``: ``anon``, ``file``, ``sample``, a directory or a file.

    ``anon``/``file`` read the shared corpus when there is one and sample this
    machine otherwise; ``sample`` always samples (half anonymous, half file
    pages). A directory holding ``*.pages`` files is read as a corpus, any other
    directory is sampled like /usr; a file is cut into pages.
    """
    if source in ("anon", "file"):
        corpus = find_corpus_dir()
        if corpus is not None and (corpus / f"{source}.pages").is_file():
            return split_pages((corpus / f"{source}.pages").read_bytes())
        if source == "anon":
            return sample_anon_pages(sample_pages, seed=seed)
        return sample_file_pages(sample_pages, seed=seed)
    if source == "sample":
        half = max(1, sample_pages // 2)
        pages = sample_anon_pages(half, seed=seed) + sample_file_pages(
            max(1, sample_pages - half), seed=seed
        )
        random.Random(seed).shuffle(pages)
        return pages
    path = Path(source)
    if path.is_dir():
        blobs = sorted(path.glob("*.pages"))
        if blobs:
            return [p for blob in blobs for p in split_pages(blob.read_bytes())]
        return sample_file_pages(sample_pages, roots=[str(path)], seed=seed)
    if path.is_file():
        pages = split_pages(path.read_bytes())
        if not pages:
            raise ConfigError(f"{path} is empty")
        return pages
    raise ConfigError(f"unknown corpus {source!r}: use anon, file, sample, a directory or a file")


def describe_source(source: str) -> str:
    """Where ``load_pages(source)`` takes its pages from, for reports."""
    if source in ("anon", "file"):
        corpus = find_corpus_dir()
        if corpus is not None and (corpus / f"{source}.pages").is_file():
            return str(corpus / f"{source}.pages")
        return "sampled: child process memory" if source == "anon" else "sampled: /usr files"
    if source == "sample":
        return "sampled: child process memory + /usr files"
    return str(Path(source))


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB pieces (to compare with write_real_image's)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_real_image(path: Path, size: int) -> str:
    """Write ``size`` bytes of real file contents (from /usr) to ``path``; return sha256.

    A disk image of real data for block-device tests and benchmarks.

    Files are read in a fixed order, so the image is the same on one machine; it
    mixes binaries, text and compressed data like a real disk image does.
    """
    h = hashlib.sha256()
    written = 0
    with path.open("wb") as out:
        for root in ("/usr/lib", "/usr/share", "/usr/bin"):
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    fp = os.path.join(dirpath, name)
                    if os.path.islink(fp) or not os.path.isfile(fp):
                        continue
                    try:
                        with open(fp, "rb") as f:
                            data = f.read(size - written)
                    except OSError:
                        continue
                    out.write(data)
                    h.update(data)
                    written += len(data)
                    if written >= size:
                        return h.hexdigest()
        # a tiny /usr: pad with deterministic text so the size is exact
        while written < size:
            data = (b"tmem filler %d\n" % written) * 64
            data = data[: size - written]
            out.write(data)
            h.update(data)
            written += len(data)
    return h.hexdigest()
