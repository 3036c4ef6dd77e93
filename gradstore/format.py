"""The store's bytes: its databases, keys, records and blocks, and the format version.

Named databases (keys are fixed-width big-endian so byte order is numeric order):
- ``meta``: b"meta" -> JSON {format_version, dim, projection, model, lora, block_bytes, created}
- ``checkpoints``: u32 index -> JSON {name, lr, step, epoch, optimizer, source}
- ``sets``: name -> JSON {id, kind, n_rows, subtasks, encodings, written}
- ``rows``: set_id u32 | chunk u64 -> zlib(JSON list of up to ROW_CHUNK row records
  {id, subtask, ...user metadata}); chunks because keys and paths repeat from row to row, so
  a chunk compresses ~8x and the metadata of LESS's 270k-row pool stays near 1% of a 1-bit
  store.
- ``blocks``: set_id u32 | checkpoint u32 | encoding (24 bytes) | block u32 -> one block:
  header (magic, n rows, crc32) | payload (n x row_bytes) | scale (n x f32) | norm (n x f32)
  [| res_norm, full_norm (n x f32 each) for centered encodings]
- ``centroids``: set_id u32 | checkpoint u32 -> float32 (dim,): the centroid that centered
  encodings of that set and checkpoint subtract, frozen at their first write

Nothing is pickled: metadata is JSON, vectors are raw little-endian arrays.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np

from . import quant
from .encodings import Encoding
from .errors import CorruptStoreError, FormatVersionError, SchemaMismatchError

FORMAT_VERSION = 2  # 2: row metadata in compressed chunks, no ids db, centroids db
DEFAULT_BLOCK_BYTES = 2 << 20  # ~2 MiB blocks: a few large zero-copy reads per scan
MAX_BLOCK_ROWS = 4096
DATA_FILE = "data.mdb"  # LMDB's file names in a store's directory
LOCK_FILE = "lock.mdb"
DBS = ("meta", "checkpoints", "sets", "rows", "blocks", "centroids")
ROW_CHUNK = 256
_BLOCK_HEADER = struct.Struct("<4sII")  # magic, n_rows, crc32 of everything after the header
_BLOCK_MAGIC = b"GSB1"
_ENC_KEY_BYTES = 24


# ---- keys ---------------------------------------------------------------------------------

def u32(i: int) -> bytes:
    """A checkpoint's key (its index), or a set id as the prefix of its rows' keys."""
    return struct.pack(">I", i)


def chunk_key(set_id: int, chunk: int) -> bytes:
    return struct.pack(">IQ", set_id, chunk)


def chunk_set_id(key) -> int:
    """The set id of a ``rows`` key."""
    return struct.unpack_from(">I", bytes(key))[0]


def centroid_key(set_id: int, ckpt: int) -> bytes:
    return struct.pack(">II", set_id, ckpt)


def block_prefix(set_id: int, ckpt: int, enc: str) -> bytes:
    return centroid_key(set_id, ckpt) + enc.encode().ljust(_ENC_KEY_BYTES, b"\0")


def block_key(set_id: int, ckpt: int, enc: str, block: int) -> bytes:
    return block_prefix(set_id, ckpt, enc) + u32(block)


def parse_block_key(key) -> tuple[int, int, str, int]:
    """(set id, checkpoint index, encoding key, block number) of a ``blocks`` key."""
    key = bytes(key)
    set_id, ckpt = struct.unpack_from(">II", key)
    enc = key[8:8 + _ENC_KEY_BYTES].rstrip(b"\0").decode(errors="replace")
    return set_id, ckpt, enc, struct.unpack_from(">I", key, 8 + _ENC_KEY_BYTES)[0]


def encoding_key(layout: dict, name: str) -> str:
    """The key an encoding's blocks are stored under: its own name, or the alternate key that
    requantize(replace=True) wrote the replacement under, so the swap is one record update."""
    return layout.get("key", name)


def alternate_key(name: str) -> str:
    """The other block key of an encoding (fits the key width, unlike a suffixed name)."""
    return f"~{zlib.crc32(name.encode()):08x}"


# ---- records ------------------------------------------------------------------------------

def loads(raw):
    return json.loads(bytes(raw))  # bytes() also takes the memoryviews of buffers=True reads


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def new_meta(dim: int, projection, model, lora, block_bytes: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "dim": int(dim),
        "projection": projection or {},
        "model": model or {},
        "lora": lora or {},
        "block_bytes": int(block_bytes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def check_version(path: str, version: int) -> None:
    if version > FORMAT_VERSION:
        raise FormatVersionError(f"{path}: store format version {version} is newer than this gradstore"
                                 f" supports ({FORMAT_VERSION}); upgrade gradstore")
    if version < FORMAT_VERSION:
        raise FormatVersionError(f"{path}: store format version {version} is older than this gradstore"
                                 f" reads ({FORMAT_VERSION}); re-run ingest into a new store")


def rows_in_every(written: dict, checkpoints) -> int:
    """Rows a set record's `written` ({checkpoint: rows}) holds at every one of `checkpoints`."""
    return min((written.get(c, 0) for c in checkpoints), default=0)


def row_record(row_id: str, subtask, metadata: dict, set_name: str) -> dict:
    """One row's metadata as stored: the caller's fields, its id and subtask; JSON or refused."""
    if not isinstance(metadata, dict):
        raise SchemaMismatchError(f"set {set_name!r}: metadata of id {row_id!r} must be a dict")
    record = dict(metadata)
    record["id"] = row_id
    record["subtask"] = subtask if subtask is not None else metadata.get("subtask")
    try:
        dumps(record)
    except (TypeError, ValueError) as exc:
        raise SchemaMismatchError(f"set {set_name!r}: metadata of id {row_id!r} is not JSON: {exc}") from None
    return record


def encode_centroid(center) -> bytes:
    return np.ascontiguousarray(center, "<f4").tobytes()


def decode_centroid(raw) -> np.ndarray:
    """A view of a stored centroid (copy it to keep it past the transaction)."""
    return np.frombuffer(raw, "<f4")


def encode_rows(records: list[dict]) -> bytes:
    return zlib.compress(dumps(records), 6)


def decode_rows(raw) -> list[dict]:
    return json.loads(zlib.decompress(bytes(raw)))


# ---- blocks -------------------------------------------------------------------------------

def block_layout(enc: Encoding, dim: int, block_bytes: int) -> dict:
    """{row_bytes, block_rows[, extra]} of `enc`'s blocks: what a set record keeps per encoding."""
    row_bytes = enc.row_bytes(dim)
    block_rows = int(min(MAX_BLOCK_ROWS, max(1, block_bytes // row_bytes)))
    layout = {"row_bytes": row_bytes, "block_rows": block_rows}
    if enc.centered:
        layout["extra"] = len(quant.CENTERED_COLUMNS)
    return layout


@dataclass(frozen=True)
class Block:
    """One block of rows as read from the store; arrays are views valid inside the scan."""

    start: int
    payload: np.ndarray  # uint8 (n, row_bytes)
    scale: np.ndarray  # float32 (n,)
    norm: np.ndarray  # float32 (n,)
    extra: np.ndarray | None = None  # float32 (n, 2) for centered encodings

    def rows(self, lo: int = 0, hi: int | None = None) -> quant.QuantizedRows:
        """Rows lo..hi-1 of the block, copied out of the map."""
        return quant.QuantizedRows(self.payload, self.scale, self.norm, self.extra).take(slice(lo, hi))


def encode_block(rows: quant.QuantizedRows) -> bytes:
    parts = [np.ascontiguousarray(rows.payload, np.uint8), np.ascontiguousarray(rows.scale, "<f4"),
             np.ascontiguousarray(rows.norm, "<f4")]
    if rows.extra is not None:  # column-major, like scale and norm
        parts.append(np.ascontiguousarray(np.asarray(rows.extra, "<f4").T))
    body = b"".join(p.tobytes() for p in parts)
    return _BLOCK_HEADER.pack(_BLOCK_MAGIC, len(rows.scale), zlib.crc32(body)) + body


def decode_block(value, layout: dict, start: int, where: str, verify: bool = False) -> Block:
    """Views over one stored block (zero-copy when `value` is a buffer); checks its framing.

    `layout` is the encoding's layout in its set record: row_bytes, and extra columns if any.
    """
    row_bytes, n_extra = layout["row_bytes"], layout.get("extra", 0)
    buf = memoryview(value)
    if len(buf) < _BLOCK_HEADER.size:
        raise CorruptStoreError(f"{where}: block truncated to {len(buf)} bytes")
    magic, n, crc = _BLOCK_HEADER.unpack_from(buf)
    expected = _BLOCK_HEADER.size + n * (row_bytes + 4 * (2 + n_extra))
    if magic != _BLOCK_MAGIC or len(buf) != expected:
        raise CorruptStoreError(f"{where}: block framing is wrong (size {len(buf)}, expected {expected})")
    body = buf[_BLOCK_HEADER.size:]
    if verify and zlib.crc32(body) != crc:
        raise CorruptStoreError(f"{where}: block checksum mismatch")
    payload = np.frombuffer(body, np.uint8, n * row_bytes).reshape(n, row_bytes)
    scale = np.frombuffer(body, "<f4", n, n * row_bytes)
    norm = np.frombuffer(body, "<f4", n, n * row_bytes + 4 * n)
    extra = None
    if n_extra:
        extra = np.frombuffer(body, "<f4", n_extra * n, n * row_bytes + 8 * n).reshape(n_extra, n).T
    return Block(start, payload, scale, norm, extra)


def read_block(txn, blocks_db, set_id: int, ckpt: int, name: str, layout: dict, block: int,
               where: str, verify: bool = False) -> Block:
    """Block `block` of one (set, checkpoint, encoding `name`): views into the map; a missing
    block is corrupt (a record says its rows are written)."""
    raw = txn.get(block_key(set_id, ckpt, encoding_key(layout, name), block), db=blocks_db)
    if raw is None:
        raise CorruptStoreError(f"{where}: missing")
    return decode_block(raw, layout, block * layout["block_rows"], where, verify)
