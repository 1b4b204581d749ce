"""Bookkeeping for the prompt-prefix KV cache (the scheduler does the KV operations).

Kiosks send the same long system prompt with every request; recomputing it costs
seconds on a 2-core CPU. Cached prefixes live in dedicated llama.cpp sequences
of the unified KV cache; a new request whose prompt starts with a cached prefix
gets those cells by ``seq_cp`` (no data moves) and prefills only the rest.

Where entries come from:

* a request with no usable match leaves its whole prompt as a *candidate* entry
  (memory only): the next request that shares a long prefix with it reveals where
  the shared part ends;
* a request that shares ``>= min_tokens`` with an entry but not all of it creates
  an *exact* entry at the shared boundary, snapshotted the moment its prefill
  reaches that point. Exact entries are what a kiosk's system prompt becomes; they
  are persisted to disk and loaded again at start-up;
* configured warm prefixes are prefilled at start-up as exact entries.

Sliding-window attention (Gemma 3/4) keeps only the last ``n_swa`` positions of a
sequence in the SWA cache, so a cached prefix can serve a shorter shared prefix
only while the positions the new sequence will attend to are still there —
:meth:`PrefixCache.usable` applies llama-server's rule for that.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE_SUFFIX = ".kvstate"


@dataclass(eq=False, slots=True)
class PrefixEntry:
    tokens: tuple[int, ...]
    seq: int
    exact: bool
    last_used: float = field(default_factory=time.monotonic)
    hits: int = 0
    #: running sequences whose KV cells include this entry's: it cannot be evicted before they end
    users: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True, slots=True)
class Match:
    entry: PrefixEntry
    #: tokens the prompt shares with the entry
    common: int


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokens_digest(tokens: tuple[int, ...]) -> str:
    return hashlib.sha256(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens)).hexdigest()[:24]


class PrefixCache:
    """Entries held in sequence ids ``seqs``; at most ``max_tokens`` KV cells in all."""

    def __init__(self, seqs: list[int], *, min_tokens: int, max_tokens: int, n_swa: int) -> None:
        self.free_seqs = list(reversed(seqs))
        self.entries: list[PrefixEntry] = []
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self.n_swa = n_swa

    @property
    def enabled(self) -> bool:
        return bool(self.free_seqs or self.entries)

    @property
    def tokens_held(self) -> int:
        return sum(len(e) for e in self.entries)

    def best_match(self, prompt: tuple[int, ...]) -> Match | None:
        best: Match | None = None
        for entry in self.entries:
            common = common_prefix(prompt, entry.tokens)
            if best is None or common > best.common or (common == best.common and len(entry) < len(best.entry)):
                best = Match(entry, common)
        return best

    def usable(self, match: Match, reuse: int, entry_pos_min: int) -> bool:
        """Can ``reuse`` tokens be taken from the entry? ``entry_pos_min`` is llama.cpp's
        ``seq_pos_min`` for the entry's sequence (the oldest position its SWA cache still holds)."""
        if reuse < self.min_tokens or reuse > match.common:
            return False
        if self.n_swa <= 0:
            return True
        return entry_pos_min <= max(0, reuse - self.n_swa)

    def has_exact(self, tokens: tuple[int, ...]) -> bool:
        return any(e.exact and e.tokens == tokens for e in self.entries)

    def touch(self, entry: PrefixEntry) -> None:
        entry.last_used = time.monotonic()
        entry.hits += 1

    def lru(self) -> PrefixEntry | None:
        """The entry to evict first: candidates before exact entries, then least recently used.

        Entries in use by running sequences are never chosen: their cells stay in the KV
        cache until those sequences end anyway, so evicting them would free nothing.
        """
        idle = [e for e in self.entries if e.users == 0]
        if not idle:
            return None
        return min(idle, key=lambda e: (e.exact, e.last_used))

    def add(self, tokens: tuple[int, ...], seq: int, *, exact: bool) -> PrefixEntry:
        entry = PrefixEntry(tokens, seq, exact)
        self.entries.append(entry)
        return entry

    def take_seq(self) -> int | None:
        return self.free_seqs.pop() if self.free_seqs else None

    def drop(self, entry: PrefixEntry) -> None:
        self.entries.remove(entry)
        self.free_seqs.append(entry.seq)


@dataclass(frozen=True, slots=True)
class PrefixStore:
    """Persisted exact entries: ``<model digest>-<tokens digest>.kvstate`` files."""

    directory: Path
    model_digest: str

    def path_for(self, tokens: tuple[int, ...]) -> Path:
        return self.directory / f"{self.model_digest}-{tokens_digest(tokens)}{STATE_SUFFIX}"

    def saved(self) -> list[Path]:
        """This model's saved prefixes, newest first."""
        if not self.directory.is_dir():
            return []
        files = list(self.directory.glob(f"{self.model_digest}-*{STATE_SUFFIX}"))
        return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)

    def verify(self, path: Path, tokens: tuple[int, ...]) -> bool:
        """The file's name must match the tokens it restored (guards against a renamed or foreign file)."""
        return path.name == self.path_for(tokens).name
