"""File digests: correct bytes, changes refused, the cache trusted only for untouched files."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import pytest

from tvorch.adapters import digests, progress
from tvorch.adapters.digests import CHUNK_SIZE, measure_file, sha256_file
from tvorch.adapters.progress import MIN_SIZE, progress_for
from tvorch.core.launch.measurements import DigestKey, FileDigest
from tvorch.errors import ImageError


class DictCache:
    """The DigestCache protocol in memory, recording what it was asked."""

    def __init__(self) -> None:
        self.entries: dict[DigestKey, str] = {}
        self.gets: list[DigestKey] = []

    def cached_digest(self, key: DigestKey) -> str | None:
        self.gets.append(key)
        return self.entries.get(key)

    def cache_digest(self, key: DigestKey, digest: str) -> None:
        self.entries[key] = digest


def _key(path: Path) -> DigestKey:
    info = path.stat()
    return DigestKey(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _data(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def _after_timestamp_tick(path: Path) -> None:
    """Wait until the file system stamps changes later than PATH's ctime.

    Timestamps move in ticks (a few ms here): without this, a change right
    after PATH was written could carry the very same mtime and ctime.
    """
    probe = path.with_name(f".{path.name}.tick")
    stamp = path.stat().st_ctime_ns
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_ctime_ns > stamp:
            break
        time.sleep(0.001)
    probe.unlink()


@pytest.fixture
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache files just written (the tests wait out timestamp ticks themselves)."""
    monkeypatch.setattr(digests, "RACY_WINDOW_NS", 0)


# --- sha256_file ---------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 12345],
    ids=["empty", "one-byte", "chunk-1", "chunk", "chunk+1", "several-chunks"],
)
def test_digest_is_sha256_of_the_bytes(tmp_path: Path, size: int) -> None:
    path = tmp_path / "file"
    data = _data(size)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_progress_reports_each_read_up_to_the_size(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(_data(2 * CHUNK_SIZE + 7))
    calls: list[tuple[int, int]] = []
    sha256_file(path, progress=lambda done, total: calls.append((done, total)))
    total = 2 * CHUNK_SIZE + 7
    assert calls == [(CHUNK_SIZE, total), (2 * CHUNK_SIZE, total), (total, total)]


def test_a_file_growing_while_hashed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(_data(3 * CHUNK_SIZE))

    def append(done: int, total: int) -> None:
        if done == CHUNK_SIZE:
            with path.open("ab") as file:
                file.write(b"more")

    with pytest.raises(ImageError, match=f"^{path} changed while it was being hashed"):
        sha256_file(path, progress=append)


def test_a_file_overwritten_in_place_while_hashed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(_data(3 * CHUNK_SIZE))
    _after_timestamp_tick(path)

    def overwrite(done: int, total: int) -> None:
        if done == 2 * CHUNK_SIZE:
            with path.open("r+b") as file:  # same size: only the timestamps tell
                file.write(b"X")

    with pytest.raises(ImageError, match="changed while it was being hashed"):
        sha256_file(path, progress=overwrite)


def test_a_file_truncated_while_hashed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(_data(3 * CHUNK_SIZE))

    def truncate(done: int, total: int) -> None:
        if done == CHUNK_SIZE:
            os.truncate(path, CHUNK_SIZE)

    with pytest.raises(ImageError, match="changed while it was being hashed"):
        sha256_file(path, progress=truncate)


def test_missing_directory_and_fifo_are_refused_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=f"^cannot read {tmp_path}/absent: No such file or directory$"):
        sha256_file(tmp_path / "absent")
    with pytest.raises(ImageError, match=f"^cannot hash {tmp_path}: not a regular file$"):
        sha256_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        sha256_file(fifo)  # refused at once, not blocked waiting for a writer


# --- measure_file and the cache ----------------------------------------------------


def test_first_measurement_hashes_and_caches_under_the_files_identity(tmp_path: Path, no_racy_window: None) -> None:
    path = tmp_path / "image"
    data = _data(CHUNK_SIZE + 3)
    path.write_bytes(data)
    cache = DictCache()
    result = measure_file(path, cache)
    digest = hashlib.sha256(data).hexdigest()
    assert result == FileDigest(str(path), "sha256", digest, len(data), cached=False)
    assert cache.entries == {_key(path): digest}


def test_a_cache_hit_reads_nothing(tmp_path: Path, no_racy_window: None, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "image"
    path.write_bytes(_data(100))
    cache = DictCache()
    # A digest no reading could produce: returning it proves nothing was read.
    cache.cache_digest(_key(path), "ab" * 32)

    def no_reading(*args: object) -> None:
        raise AssertionError("the file was read despite a cache hit")

    monkeypatch.setattr(digests, "_hash_file", no_reading)
    result = measure_file(path, cache)
    assert result == FileDigest(str(path), "sha256", "ab" * 32, 100, cached=True)
    assert cache.gets == [_key(path)]


def test_rehash_reads_again_and_replaces_the_cached_digest(tmp_path: Path, no_racy_window: None) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"bytes")
    cache = DictCache()
    cache.cache_digest(_key(path), "00" * 32)
    result = measure_file(path, cache, rehash=True)
    assert not result.cached
    assert result.digest == hashlib.sha256(b"bytes").hexdigest()
    assert cache.entries[_key(path)] == result.digest
    assert cache.gets == []


def _touch(path: Path) -> None:
    os.utime(path)


def _rewrite(path: Path) -> None:
    path.write_bytes(path.read_bytes())  # same bytes, same size


def _chmod(path: Path) -> None:
    os.chmod(path, 0o640)


def _chown(path: Path) -> None:
    info = path.stat()
    os.chown(path, info.st_uid, info.st_gid)  # even an unchanged owner stamps ctime


def _replace(path: Path) -> None:
    twin = path.with_name("twin")
    twin.write_bytes(path.read_bytes())
    os.replace(twin, path)


@pytest.mark.parametrize("change", [_touch, _rewrite, _chmod, _chown, _replace], ids=lambda f: f.__name__[1:])
def test_any_change_to_the_file_misses_the_cache(tmp_path: Path, no_racy_window: None, change) -> None:
    path = tmp_path / "image"
    path.write_bytes(_data(1000))
    path.chmod(0o600)
    cache = DictCache()
    assert not measure_file(path, cache).cached
    assert measure_file(path, cache).cached
    key_before = _key(path)
    _after_timestamp_tick(path)
    change(path)
    assert _key(path) != key_before
    again = measure_file(path, cache)
    assert not again.cached
    assert again.digest == hashlib.sha256(_data(1000)).hexdigest()
    assert cache.gets[-1] == _key(path)
    assert measure_file(path, cache).cached


def test_a_file_changed_just_now_is_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"fresh")
    cache = DictCache()
    assert not measure_file(path, cache).cached
    assert not measure_file(path, cache).cached
    assert cache.entries == {}


# --- progress bar ----------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        file.truncate(size)
    return path


def test_no_bar_for_small_files_missing_files_or_when_not_on_a_terminal(tmp_path: Path) -> None:
    big = _sparse(tmp_path / "big.qcow2", MIN_SIZE)
    assert progress_for(_sparse(tmp_path / "small.qcow2", MIN_SIZE - 1), Terminal()) is None
    assert progress_for(tmp_path / "absent.qcow2", Terminal()) is None
    assert progress_for(big, io.StringIO()) is None
    assert progress_for(big, Terminal()) is not None


def test_bar_draws_throttled_in_place_and_ends_with_a_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress, "monotonic", lambda: clock[0])
    terminal = Terminal()
    total = 2 * 2**30
    draw = progress_for(_sparse(tmp_path / "base.qcow2", total), terminal)
    assert draw is not None
    clock[0] = 100.8
    draw(903_000_000, total)  # 0.9 GB in 0.8 s
    clock[0] = 100.85
    draw(int(total * 0.5), total)  # within 0.1 s of the last redraw: skipped
    clock[0] = 101.9
    draw(total, total)  # the end is always drawn
    draw(total, total)  # and only once
    assert terminal.getvalue() == (
        "\rhashing base.qcow2  42% 0.8 GiB/2.0 GiB 1.1 GB/s"
        "\rhashing base.qcow2 100% 2.0 GiB/2.0 GiB 1.1 GB/s\n"
    )


def test_bar_with_sha256_file_ends_at_the_files_size(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "image.raw", MIN_SIZE)
    terminal = Terminal()
    sha256_file(path, progress=progress_for(path, terminal))
    last = terminal.getvalue().rsplit("\r", 1)[1]
    assert last.startswith("hashing image.raw 100% 0.2 GiB/0.2 GiB ")
    assert last.endswith(" GB/s\n")
    assert terminal.getvalue().count("\n") == 1
