"""Store operations beyond ingest and query, one module each:

- ``merge(sources, out)`` (merge.py): combine stores computed separately (shards of one pool,
  or checkpoints) into a new store after checking that they are compatible.
- ``requantize(store, ...)`` (requantize.py): derive lower encodings (per-row or ``-global``)
  from the float master without the model.
- ``compare(store, a, b, ...)`` (compare.py): how well two encodings or two queries agree.
- ``check(store, fix=False)`` (check.py): verify every block and record; ``fix`` keeps what
  verifies and drops the rest, saying what it dropped.

Long operations take `progress` (see progress.py); the library never prints.
"""

from .check import CheckReport, Finding, check
from .compare import Comparison, compare, parse_k, rankdata, spearman
from .merge import MergeReport, merge
from .requantize import requantize

__all__ = ["CheckReport", "Comparison", "Finding", "MergeReport", "check", "compare", "merge",
           "parse_k", "rankdata", "requantize", "spearman"]
