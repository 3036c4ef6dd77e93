"""The engine's exceptions: one base class, subclasses that are also the matching builtin.

Every message is one line and names the file, set, checkpoint, encoding, row or field at fault.
"""


class GradstoreError(Exception):
    "Base class of every error gradstore raises."


class StoreNotFoundError(GradstoreError, FileNotFoundError):
    "The path is not a gradstore store."


class StoreExistsError(GradstoreError, FileExistsError):
    "A store already exists at the path."


class FormatVersionError(GradstoreError, ValueError):
    "The store was written in another format version (older or newer) than this gradstore reads."


class ReadOnlyError(GradstoreError, PermissionError):
    "A write was attempted on a store opened read-only."


class SchemaMismatchError(GradstoreError, ValueError):
    "Vectors, dims, projections or encodings do not match what the store holds."


class InvalidVectorError(GradstoreError, ValueError):
    "A vector holds NaN or inf."


class DuplicateIdError(GradstoreError, ValueError):
    "A row id appears twice in a set."


class UnknownNameError(GradstoreError, KeyError):
    "A set, checkpoint, task or encoding that the store does not hold."

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CorruptStoreError(GradstoreError, IOError):
    "A block failed its checksum or the store's records disagree."


class DiskFullError(GradstoreError, OSError):
    "The disk filled up during a write: that batch is not in the store, every earlier one is."


class StoreBusyError(GradstoreError, BlockingIOError):
    "Another process has the store open, so its data file cannot be rewritten now."


class QuerySyntaxError(GradstoreError, ValueError):
    "A query does not parse; carries the position and what was expected."

    def __init__(self, message: str, query: str = "", position: int = 0, expected: str = ""):
        super().__init__(message)
        self.query = query
        self.position = position
        self.expected = expected
