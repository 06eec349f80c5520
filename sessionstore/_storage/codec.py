"""How a document's JSON bytes become a stored file and back (pure: no I/O).

Owns the stored file format (docs/architecture.md, "Storage") as the
storage layer writes it: zstd above ``compress_threshold``, a CRC-32 of
the stored bytes, inline up to ``inline_threshold`` and fixed-size shards
beyond, and the checks that make a
damaged file fail loudly (:class:`~sessionstore.errors.CorruptDataError`).
Also the process-local zstd contexts, which hold C threads and so are dropped
in a forked child (see docs/architecture.md, "Processes").
"""

from __future__ import annotations

import ctypes
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import zstandard

from ..errors import CorruptDataError

__all__ = [
    "CODEC_NAMES",
    "CODEC_RAW",
    "CODEC_ZSTD",
    "EncodedFile",
    "FileSettings",
    "after_fork",
    "compress_stream",
    "decode_file",
    "encode_file",
]

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd"}


@dataclass(frozen=True)
class FileSettings:
    """Encoding knobs of a Store (see the configuration page for their meaning)."""

    compression_level: int = 3
    compress_threshold: int = 1024
    inline_threshold: int = 256 * 1024
    shard_size: int = 1024 * 1024
    threaded_compression_threshold: int = 8 * 1024 * 1024
    stream_threshold: int = 8 * 1024 * 1024

    def streams(self, raw_size: int) -> bool:
        """Is a document of ``raw_size`` bytes written by the streamed write?"""
        return raw_size >= self.stream_threshold and raw_size >= self.compress_threshold

    def compressor(self, raw_size: int) -> AbstractContextManager[zstandard.ZstdCompressor]:
        """A compressor for a document of ``raw_size`` bytes, for the ``with`` block.

        Small documents use this thread's cached single-threaded context.
        Large ones get a context of their own with zstd's worker threads (C
        threads, one per core): not cached, since a context whose threads did
        not survive a fork hangs when it is freed (see :func:`after_fork`).
        The output is the same single frame either way.
        """
        if raw_size >= self.threaded_compression_threshold:
            return _threaded(self.compression_level)
        return nullcontext(_compressor(self.compression_level))


@dataclass(frozen=True)
class EncodedFile:
    """A document as it is stored: codec, sizes, checksum, inline bytes or shards."""

    codec: int
    raw_size: int
    stored_size: int
    checksum: int
    inline: bytes | None
    shards: list[memoryview]

    @classmethod
    def pending(cls, raw_size: int) -> EncodedFile:
        """The file of a streamed write before it is made: zstd, sizes and checksum to come."""
        return cls(CODEC_ZSTD, raw_size, 0, 0, None, [])


_local = threading.local()
_threaded_lock = threading.Lock()
_threaded_in_use: set[zstandard.ZstdCompressor] = set()


@contextmanager
def _threaded(level: int) -> Iterator[zstandard.ZstdCompressor]:
    cctx = zstandard.ZstdCompressor(level=level, threads=-1)
    with _threaded_lock:
        _threaded_in_use.add(cctx)
    try:
        yield cctx
    finally:
        with _threaded_lock:
            _threaded_in_use.discard(cctx)


def after_fork() -> None:
    """In a forked child: forget the parent's zstd contexts, never free a threaded one.

    A multi-threaded context in use by another thread at the fork has worker
    threads that do not exist in the child: freeing it would wait for them
    forever. Those few are kept alive for the child's lifetime; the cached
    single-threaded ones are simply dropped.
    """
    global _local, _threaded_lock, _threaded_in_use
    for cctx in _threaded_in_use:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(cctx))
    _threaded_in_use = set()
    _threaded_lock = threading.Lock()
    _local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def encode_file(raw: bytes, settings: FileSettings) -> EncodedFile:
    """Compress (when worth it), checksum and, if large, split a document's JSON bytes."""
    if len(raw) >= settings.compress_threshold:
        with settings.compressor(len(raw)) as cctx:
            stored = cctx.compress(raw)
        codec = CODEC_ZSTD
    else:
        stored, codec = raw, CODEC_RAW
    checksum = zlib.crc32(stored)
    if len(stored) <= settings.inline_threshold:
        return EncodedFile(codec, len(raw), len(stored), checksum, stored, [])
    view = memoryview(stored)
    size = settings.shard_size
    # Views, not copies: psycopg sends a memoryview as bytea as it is.
    shards = [view[start : start + size] for start in range(0, len(stored), size)]
    return EncodedFile(codec, len(raw), len(stored), checksum, None, shards)


def compress_stream(raw: bytes, settings: FileSettings) -> Iterator[bytes]:
    """The zstd frame of ``raw``, in the pieces the streamed write sends.

    The JSON goes to the compressor four shards' worth at a time: small
    enough that the first shards leave early, large enough to keep zstd's
    workers busy (4, 8 and 16 MiB measured the same). The output is the
    same bytes every time for the same input and settings.
    """
    with settings.compressor(len(raw)) as cctx:
        stream = cctx.compressobj(size=len(raw))
        feed = 4 * settings.shard_size
        view = memoryview(raw)
        for start in range(0, len(raw), feed):
            yield stream.compress(view[start : start + feed])
        yield stream.flush()


def decode_file(
    codec: int,
    raw_size: int,
    checksum: int,
    shard_count: int,
    inline: bytes | None,
    shards: Sequence[bytes] | None,
    context: str,
) -> bytes:
    """Reassemble, verify and decompress stored bytes; :class:`CorruptDataError` if damaged."""
    if shard_count:
        found = len(shards or ())
        if found != shard_count:
            raise CorruptDataError(
                f"{context}: {shard_count - found} of {shard_count} shards missing"
            )
        stored = b"".join(shards or ())
    elif inline is None:
        raise CorruptDataError(f"{context}: version has neither inline bytes nor shards")
    else:
        stored = bytes(inline)
    if zlib.crc32(stored) != checksum:
        raise CorruptDataError(f"{context}: checksum mismatch")
    if codec == CODEC_RAW:
        raw = stored
    elif codec == CODEC_ZSTD:
        try:
            raw = _decompressor().decompress(stored, max_output_size=raw_size)
        except zstandard.ZstdError as exc:
            raise CorruptDataError(f"{context}: zstd data does not decode: {exc}") from exc
    else:
        raise CorruptDataError(f"{context}: unknown codec {codec}")
    if len(raw) != raw_size:
        raise CorruptDataError(f"{context}: decoded {len(raw)} bytes, expected {raw_size}")
    return raw
