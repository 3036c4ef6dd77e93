"""What gradstore.ops builds on, behind one internal object (not public API).

Rows are copied between stores in stored form (merge); derived encodings are staged as blocks
under a key nothing points at, then shown in one transaction (requantize, merge's ``-global``
encodings); check and fix read and rewrite the databases directly.
"""

from __future__ import annotations

from typing import Sequence

from . import quant
from .encodings import parse_encoding
from .errors import CorruptStoreError, SchemaMismatchError
from .format import (
    block_key,
    block_prefix,
    centroid_key,
    dumps,
    encode_block,
    encode_centroid,
    encoding_key,
    loads,
    row_record,
)
from .store import Store, check_unique_ids, refuse_global


class Staging:
    """A store's maintenance interface; `write=True` refuses a store open read-only."""

    def __init__(self, store: Store, write: bool = False):
        self._store = store
        if write:
            store._environment.require_writable()

    @property
    def dbs(self) -> dict:
        """The named databases (see gradstore.format), for check and fix."""
        return self._store._dbs

    def write(self, fn):
        """Run fn(txn) in one write transaction (grown and retried on a full map)."""
        return self._store._environment.write(fn)

    def set_records(self) -> dict:
        """Every set record by name (with its numeric id), in creation order."""
        st = self._store
        with st.env.begin() as txn:
            recs = {bytes(k).decode(): loads(v) for k, v in txn.cursor(db=st._dbs["sets"])}
        return dict(sorted(recs.items(), key=lambda kv: kv[1]["id"]))

    def block_layout(self, encoding: str) -> dict:
        """{row_bytes, block_rows} of `encoding` in this store."""
        return self._store._layout(parse_encoding(encoding))

    def read_range(self, set_name: str, checkpoint: str, encoding: str, start: int,
                   stop: int) -> quant.QuantizedRows:
        """Stored rows start..stop-1 of one (set, checkpoint, encoding), copied; reads only their blocks."""
        st = self._store
        enc = parse_encoding(encoding)
        with st.env.begin(buffers=True) as txn:
            rec = st._set_record(txn, set_name)
            layout = st._encoding_layout(rec, set_name, enc)
            ci = st._checkpoint_index(txn, checkpoint)
            n = rec["written"].get(checkpoint, 0)
            if not 0 <= start <= stop <= n:
                raise ValueError(f"set {set_name!r} checkpoint {checkpoint!r}: rows {start}..{stop}"
                                 f" are outside the {n} written")
            br = layout["block_rows"]
            parts = []
            for b in range(start // br, (stop + br - 1) // br):
                blk = st._read_block(txn, rec, layout, set_name, enc, checkpoint, ci, b)
                lo, hi = max(start - b * br, 0), min(stop - b * br, br)
                if hi > len(blk.scale):
                    raise CorruptStoreError(f"{st.path}: set {set_name!r} checkpoint {checkpoint!r}"
                                            f" encoding {enc.name} block {b}: holds {len(blk.scale)}"
                                            f" rows, expected {hi}")
                parts.append(blk.rows(lo, hi))
        return quant.QuantizedRows.concat(parts) if parts else st._no_rows(enc)

    def write_quantized(self, set_name: str, checkpoint: str, rows: dict, ids: Sequence[str],
                        kind: str = "train", metadata: Sequence[dict] | None = None) -> int:
        """Append rows already in stored form, {encoding: QuantizedRows}, in one transaction.

        As `Store.write` (same order and duplicate rules), for copying rows between stores
        without a lossy round trip (merge). `metadata` records are taken as `rows()` returns them.
        """
        st = self._store
        st._environment.require_writable()
        ids = [str(i) for i in ids]
        n = len(ids)
        check_unique_ids(ids, set_name)
        encs = [parse_encoding(e) for e in rows]
        refuse_global(encs)
        for enc in encs:
            if enc.centered:  # each source froze its own centroid; their residuals do not mix
                raise SchemaMismatchError(
                    f"set {set_name!r}: {enc.name} rows cannot be copied between stores (each froze"
                    " its own centroid); merge the other encodings and requantize")
        for enc in encs:
            got = rows[enc.name]
            shape = (n, enc.row_bytes(st.dim))
            if got.payload.shape != shape or got.scale.shape != (n,) or got.norm.shape != (n,):
                raise SchemaMismatchError(
                    f"set {set_name!r}: {enc.name} rows must be payload {shape}, scale and norm ({n},)")
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        rows_meta = [row_record(i, None, m, set_name) for i, m in zip(ids, metadata)]
        return st._append_rows(set_name, checkpoint, kind, encs, ids, rows_meta, dict(rows))

    def stage_blocks(self, set_name: str, checkpoint: str, encoding: str, key: str, start: int,
                     rows: quant.QuantizedRows) -> None:
        """Write blocks of `encoding` under block key `key` from row `start` (a block boundary).

        Nothing points at them until `commit_encodings`, so readers never see them half-written;
        a re-run overwrites them.
        """
        st = self._store
        br = self.block_layout(encoding)["block_rows"]
        if start % br:
            raise ValueError(f"stage_blocks: start {start} is not a multiple of {br} rows")

        def put(txn):
            set_id = st._set_record(txn, set_name)["id"]
            ci = st._checkpoint_index(txn, checkpoint)
            for lo in range(0, len(rows.scale), br):
                txn.put(block_key(set_id, ci, key, (start + lo) // br),
                        encode_block(rows.take(slice(lo, lo + br))), db=st._dbs["blocks"])

        self.write(put)

    def clear_blocks(self, set_name: str, checkpoint: str, key: str, batch: int = 256) -> int:
        """Delete the blocks of (set, checkpoint) stored under block key `key`, a few per transaction."""
        st = self._store
        total = 0
        while True:
            def drop(txn):
                prefix = block_prefix(st._set_record(txn, set_name)["id"],
                                      st._checkpoint_index(txn, checkpoint), key)
                cur = txn.cursor(db=st._dbs["blocks"])
                n = 0
                if cur.set_range(prefix):
                    while n < batch and bytes(cur.key()).startswith(prefix):
                        cur.delete()  # moves to the next record
                        n += 1
                return n

            n = self.write(drop)
            total += n
            if n < batch:
                return total

    def commit_encodings(self, set_name: str, layouts: dict, scales: dict, written: dict,
                         centroids: dict | None = None) -> dict:
        """Show staged encodings in one transaction: set their layouts (with block key) and scales,
        and the centroids ({checkpoint: vector}) the staged centered encodings subtract.

        Refused if the set's `written` counts are no longer `written` (rows arrived meanwhile).
        Returns {encoding: block key it replaced} for the caller to clear.
        """
        st = self._store

        def flip(txn):
            rec = st._set_record(txn, set_name)
            if rec["written"] != written:
                raise SchemaMismatchError(
                    f"set {set_name!r} changed while its encodings were derived; run again")
            for checkpoint, center in (centroids or {}).items():
                key = centroid_key(rec["id"], st._checkpoint_index(txn, checkpoint))
                txn.put(key, encode_centroid(center), db=st._dbs["centroids"])
            old = {}
            for name, layout in layouts.items():
                if name in rec["encodings"]:
                    old[name] = encoding_key(rec["encodings"][name], name)
                rec["encodings"][name] = layout
                rec.setdefault("scales", {}).pop(name, None)
                if scales.get(name):
                    rec["scales"][name] = scales[name]
            if not rec.get("scales"):
                rec.pop("scales", None)
            txn.put(set_name.encode(), dumps(rec), db=st._dbs["sets"])
            return old

        return self.write(flip)
