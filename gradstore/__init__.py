"""gradstore: an embedded LMDB datastore of quantized LLM gradients for LESS/QLESS selection.

Imports numpy, numba and lmdb; never torch.
"""

from .encodings import Encoding, parse_encoding
from .errors import (
    CorruptStoreError,
    DuplicateIdError,
    FormatVersionError,
    GradstoreError,
    InvalidVectorError,
    QuerySyntaxError,
    ReadOnlyError,
    SchemaMismatchError,
    StoreExistsError,
    StoreNotFoundError,
    UnknownNameError,
    WriterBusyError,
)

__version__ = "0.1.0"

__all__ = [
    "Encoding",
    "parse_encoding",
    "CorruptStoreError",
    "DuplicateIdError",
    "FormatVersionError",
    "GradstoreError",
    "InvalidVectorError",
    "QuerySyntaxError",
    "ReadOnlyError",
    "SchemaMismatchError",
    "StoreExistsError",
    "StoreNotFoundError",
    "UnknownNameError",
    "WriterBusyError",
]
