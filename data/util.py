"""Small helpers shared by data preparation and the orchestrator: file hashes, sizes and counts
written by people ("64MB", "1.1B"), and durations for progress lines.

They live here, in the lower layer, because `orchestrator/` imports `data/` and never the other
way round; the orchestrator has no copies of its own.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I)?)?B?\s*", re.IGNORECASE)
_COUNT = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmbt]?)\s*")
_COUNT_SCALE = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
_PREFIX_POWER = {"K": 1, "M": 2, "G": 3, "T": 4}


def file_sha256(path: str | Path, chunk: int = 16 << 20) -> str:
    """Hex SHA-256 of a file, read in `chunk`-byte blocks (multi-GB files, constant memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parse_size(text: str | int) -> int:
    """Bytes from '5GB', '64M', '4KB', '2GiB' or '1024' (KB/MB/GB/TB decimal, KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"size {text!r} is not like 5GB, 500MB, 2GiB or a number of bytes")
    number, prefix, binary = m.groups()
    scale = 1
    if prefix:
        scale = (1024 if binary else 1000) ** _PREFIX_POWER[prefix.upper()]
    return int(float(number) * scale)


def parse_count(text: str | float | int) -> float:
    """A number from '1.1B', '400M', '20k', '1e9' or 3e8 (k, m, b, t: thousand to trillion)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _COUNT.fullmatch(text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a count: write e.g. 1.1B, 400M, 1e9")
    return float(m.group(1)) * _COUNT_SCALE[m.group(2)]


def format_duration(seconds: float) -> str:
    """'1h02m03s' / '4m05s'; '?' for an unknown (inf or NaN) duration."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
