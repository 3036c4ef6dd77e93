"""gradstore: an embedded LMDB datastore of quantized LLM gradients for LESS/QLESS selection.

Imports numpy, numba and lmdb; never torch.
"""

from .encodings import Encoding, parse_encoding
from .errors import (
    CorruptStoreError,
    DiskFullError,
    DuplicateIdError,
    FormatVersionError,
    GradstoreError,
    InvalidVectorError,
    QuerySyntaxError,
    ReadOnlyError,
    SchemaMismatchError,
    StoreBusyError,
    StoreExistsError,
    StoreNotFoundError,
    UnknownNameError,
)

__version__ = "0.1.0"

from .env import compact  # noqa: E402
from .format import Block  # noqa: E402
from .store import Store, create, open  # noqa: E402,A004  (gradstore.open is the API)
from .sharded import ShardedStore, open_sharded  # noqa: E402

__all__ = [
    "Block",
    "Store",
    "compact",
    "create",
    "open",
    "open_sharded",
    "ShardedStore",
    "Encoding",
    "parse_encoding",
    "CorruptStoreError",
    "DiskFullError",
    "DuplicateIdError",
    "FormatVersionError",
    "GradstoreError",
    "InvalidVectorError",
    "QuerySyntaxError",
    "ReadOnlyError",
    "SchemaMismatchError",
    "StoreBusyError",
    "StoreExistsError",
    "StoreNotFoundError",
    "UnknownNameError",
]
