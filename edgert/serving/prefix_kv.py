"""The KV side of the prefix cache, for the scheduler: plan, attach, snapshot, evict, persist, restore.

:mod:`edgert.serving.prefix_cache` decides which token prefixes are worth keeping and
holds no KV; :class:`PrefixKV` makes the batch backend's KV cells follow those decisions
(copying a prefix into a new sequence, snapshotting a prefill into a cache entry, saving
and restoring exact entries) and counts the cells entries hold in the scheduler's
:class:`~edgert.serving.scheduler_config.SchedulerStats`. It runs only under the
scheduler: on the engine thread, or under its lock.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from edgert.engine.base import Backend
from edgert.errors import EdgertError
from edgert.serving.prefix_cache import Match, PrefixCache, PrefixEntry, PrefixStore
from edgert.serving.scheduler_config import SchedulerConfig, SchedulerStats
from edgert.serving.sequence import SequenceState

log = logging.getLogger("edgert.scheduler")


@dataclass(frozen=True, slots=True)
class PrefixPlan:
    match: Match
    #: tokens to take from the entry (the last prompt token is always computed)
    reuse: int
    #: False when the sliding window no longer holds the positions the reuse needs
    usable: bool


class PrefixKV:
    """Cached prefixes held in the backend's spare sequences (``config.prefix_seqs``)."""

    def __init__(self, backend: Backend, config: SchedulerConfig, stats: SchedulerStats, kv_cells: int) -> None:
        self._backend = backend
        self._config = config
        self._stats = stats
        #: KV cells admission may reserve in all (the scheduler's budget, which entries share)
        self._kv_cells = kv_cells
        self.cache = PrefixCache(
            list(config.prefix_seqs),
            min_tokens=config.prefix_min_tokens,
            max_tokens=config.prefix_max_tokens,
            n_swa=backend.info.n_swa,
        )
        #: private KV: exact entries whose stream copy llama.cpp runs at the next decode, saved after it
        self._unsaved: list[PrefixEntry] = []

    def evict_lru(self) -> bool:
        """Evict the least recently used entry no sequence shares; False when there is none."""
        victim = self.cache.lru()
        if victim is None:
            return False
        self.evict(victim)
        return True

    def plan(self, seq: SequenceState) -> PrefixPlan | None:
        """The cached prefix a queued sequence would start from, if any (decided before admission)."""
        cache = self.cache
        if seq.request.prefill_only:
            return None
        prompt = seq.request.prompt
        match = cache.best_match(prompt)
        if match is None or match.common < cache.min_tokens:
            return None
        # the last prompt token always yields the first logits; a medium is taken whole or not at all
        reuse = seq.request.media_boundary(min(match.common, len(prompt) - 1))
        if reuse < cache.min_tokens:
            return None
        usable = cache.usable(match, reuse, self._backend.seq_pos_min(match.entry.seq))
        return PrefixPlan(match, reuse, usable)

    def attach(self, seq: SequenceState, plan: PrefixPlan | None) -> bool:
        """Give a newly admitted sequence its planned cached prefix, and plan a snapshot.

        True when the sequence is already done: a prefill-only prompt the cache holds exactly.
        """
        cache = self.cache
        prompt = seq.request.prompt
        if seq.request.prefill_only:
            if cache.has_exact(prompt):
                seq.prompt_fed = seq.n_past = len(prompt)
                return True
            seq.snapshot_at, seq.snapshot_exact = len(prompt), True
            return False
        if plan is not None and plan.usable:
            entry, reuse = plan.match.entry, plan.reuse
            self._copy_prefix(entry.seq, seq.slot, reuse)
            seq.prompt_fed = seq.n_past = seq.cached = reuse
            seq.shared = entry  # pinned by the scheduler's admission
            cache.touch(entry)
            self._stats.prefix_hits += 1
            self._stats.prefix_tokens_reused += reuse
            if reuse < len(entry) and not cache.has_exact(prompt[:reuse]):
                # the shared part ends inside this entry: keep exactly the shared part
                self.snapshot(entry.seq, prompt[:reuse], exact=True)
            return False
        if plan is not None:
            if not cache.has_exact(prompt[: plan.reuse]):
                seq.snapshot_at, seq.snapshot_exact = plan.reuse, True
        elif len(prompt) - 1 >= cache.min_tokens:
            seq.snapshot_at, seq.snapshot_exact = len(prompt) - 1, False
        self._stats.prefix_misses += 1
        return False

    def snapshot(
        self, source_seq: int, tokens: tuple[int, ...], *, exact: bool, owner: SequenceState | None = None
    ) -> None:
        """Copy positions [0, len(tokens)) of ``source_seq`` into a cache entry (cells are shared, not copied).

        With ``owner`` (the running sequence that computed the cells) the cells move from the
        owner's reservation to the entry, which the owner then shares; otherwise they are counted anew.
        """
        cache = self.cache
        if len(tokens) > cache.max_tokens:
            return
        need = len(tokens)
        while not cache.free_seqs or cache.tokens_held + need > cache.max_tokens:
            victim = cache.lru()
            if victim is None or (victim.exact and not exact):
                return  # a mere candidate never pushes out a proven shared prefix
            self.evict(victim)
        transfer = owner is not None and owner.shared is None and owner.reserve >= need
        if not transfer and self._stats.kv_reserved + need > self._kv_cells:
            return
        seq_id = cache.take_seq()
        assert seq_id is not None
        self._copy_prefix(source_seq, seq_id, need)
        entry = cache.add(tokens, seq_id, exact=exact)
        if transfer:
            assert owner is not None
            owner.reserve -= need
            owner.shared = entry
            entry.users += 1
        else:
            self._stats.kv_reserved += need
        self._stats.prefix_entries = len(cache.entries)
        store = self._config.prefix_store
        if exact and store is not None:
            if self._config.private_kv:
                self._unsaved.append(entry)
            else:
                self._persist(store, entry)

    def _copy_prefix(self, source_seq: int, target_seq: int, n_tokens: int) -> None:
        """Positions [0, n_tokens) of ``source_seq`` into the empty ``target_seq``.

        One KV pool: the cells get one more sequence tag, nothing moves. Private KV: llama.cpp
        copies only whole sequence streams, so the whole source is copied and the tail dropped;
        the data moves at the start of the next decode (saving such an entry waits for that).
        """
        backend = self._backend
        if not self._config.private_kv:
            backend.seq_copy(source_seq, target_seq, 0, n_tokens)
            return
        backend.seq_copy(source_seq, target_seq)
        backend.seq_remove(target_seq, n_tokens)

    def take_unsaved(self) -> list[PrefixEntry]:
        """The entries the coming decode copies (private KV); pass them to :meth:`persist_copied` after it."""
        unsaved, self._unsaved = self._unsaved, []
        return unsaved

    def persist_copied(self, entries: list[PrefixEntry]) -> None:
        """Save entries whose (private KV) stream copy the decode just made, if still cached."""
        store, cache = self._config.prefix_store, self.cache
        if store is None:
            return
        for entry in entries:
            if entry in cache.entries:
                self._persist(store, entry)

    def _persist(self, store: PrefixStore, entry: PrefixEntry) -> None:
        path = store.path_for(entry.tokens)
        tmp = path.with_suffix(".tmp")
        try:
            store.directory.mkdir(parents=True, exist_ok=True)
            self._backend.save_seq_state(entry.seq, tmp, list(entry.tokens))
            tmp.replace(path)
        except (OSError, EdgertError) as exc:
            log.warning("could not persist a cached prefix to %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def evict(self, entry: PrefixEntry) -> None:
        assert entry.users == 0, "a prefix entry in use cannot be evicted"
        self._backend.seq_remove(entry.seq)
        self.cache.drop(entry)
        self._stats.kv_reserved -= len(entry)
        self._stats.prefix_entries = len(self.cache.entries)
        store = self._config.prefix_store
        if entry.exact and store is not None:
            with contextlib.suppress(OSError):
                store.path_for(entry.tokens).unlink()

    def load_saved(self) -> None:
        """Restore persisted prefixes (newest first) before the engine thread starts."""
        cache, store = self.cache, self._config.prefix_store
        if store is None:
            return
        for path in store.saved():
            seq_id = cache.take_seq()
            if seq_id is None:
                break
            try:
                tokens = tuple(self._backend.load_seq_state(seq_id, path, cache.max_tokens))
            except EdgertError as exc:
                tokens = ()
                log.warning("ignoring cached prefix %s: %s", path.name, exc)
            room = cache.tokens_held + len(tokens) <= cache.max_tokens
            if not tokens or not store.verify(path, tokens) or not room:
                self._backend.seq_remove(seq_id)
                cache.free_seqs.append(seq_id)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            cache.add(tokens, seq_id, exact=True)
            self._stats.kv_reserved += len(tokens)
        self._stats.prefix_entries = len(cache.entries)
        if cache.entries:
            log.info("restored %d cached prefixes from %s", len(cache.entries), store.directory)
