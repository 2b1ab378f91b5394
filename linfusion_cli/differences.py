"""Where two ranks' descriptions of what they make differ: a digest to compare cheaply, and the
first differing field to name in the one error line."""

from __future__ import annotations

import hashlib
import json


def digest(made) -> str:
    """SHA-256 of a JSON-able value (keys sorted): equal values, equal digests, on any rank."""
    return hashlib.sha256(json.dumps(made, sort_keys=True, default=str).encode()).hexdigest()


def first_difference(want, got, where: str = "", who: str = "here") -> str | None:
    """The first field where `got` differs from `want` (rank 0's), as 'path: A on rank 0, B here'."""
    if isinstance(want, dict) and isinstance(got, dict):
        for key in list(want) + [k for k in got if k not in want]:
            if key not in want or key not in got:
                return f"{where}{key} is {'missing' if key not in got else 'only'} {who}"
            found = first_difference(want[key], got[key], f"{where}{key}.", who)
            if found is not None:
                return found
        return None
    if isinstance(want, list) and isinstance(got, list):
        for i, (a, b) in enumerate(zip(want, got)):
            found = first_difference(a, b, f"{where.rstrip('.')}[{i}].", who)
            if found is not None:
                return found
        if len(want) != len(got):
            return f"{where.rstrip('.') or 'entries'}: {len(want)} on rank 0, {len(got)} {who}"
        return None
    if want != got:
        return f"{where.rstrip('.')}: {_short(want)} on rank 0, {_short(got)} {who}"
    return None


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
