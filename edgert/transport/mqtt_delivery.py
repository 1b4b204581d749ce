"""What MQTT delivery keeps between messages: the reply cache and the outbox.

Plain bookkeeping, bounded in entries and in bytes, with no paho and no serving in it; the
transport (:mod:`.mqtt`) decides when to use each. Split out of ``mqtt.py`` to keep that module
about requests and replies.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from edgert.transport.mqtt_link import Outgoing


@dataclass
class CacheEntry:
    #: the final reply, once the request has finished
    final: Outgoing | None = None
    nbytes: int = 0
    #: monotonic time the final was last resent to a redelivery
    resent_at: float | None = None


def _key_bytes(key: tuple[str, str]) -> int:
    return len(key[0].encode()) + len(key[1].encode())


class ReplyCache:
    """Recent request keys -> the final reply they produced; bounded in entries and in bytes.

    A key is (reply topic, request id): two clients that both number their requests
    from 1 never collide. Only the final message is kept (topic, Correlation Data and
    key counted), never the chunks of a stream: a redelivery gets the outcome, not a
    second copy of the whole stream. Only requests that ran are cached; a refusal
    (overloaded) is not, so a retry with the same id after ``retry_after`` does run.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[str, str], CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str]) -> CacheEntry | None:
        return self._entries.get(key)

    def start(self, key: tuple[str, str]) -> CacheEntry:
        self.forget(key)
        entry = CacheEntry(nbytes=_key_bytes(key))
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        self._evict()
        return entry

    def finish(self, key: tuple[str, str], entry: CacheEntry, final: Outgoing) -> None:
        if self._entries.get(key) is not entry:
            return  # evicted or replaced meanwhile
        entry.final = final
        entry.nbytes += final.size()
        self.nbytes += final.size()
        self._entries.move_to_end(key)
        self._evict()

    def forget(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def _evict(self) -> None:
        # Oldest finished entries go first; running ones are bounded by the scheduler's queue.
        for key in list(self._entries):
            if len(self._entries) <= self.max_entries and self.nbytes <= self.max_bytes:
                return
            if self._entries[key].final is not None:
                self.forget(key)


class Outbox:
    """Replies waiting for room in paho's window, bounded in messages and in bytes.

    Resent duplicates wait in their own queue and are the first to go when the bounds
    are reached; a resent duplicate never pushes out a first reply (it is dropped itself).
    """

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._first: deque[Outgoing] = deque()
        self._resent: deque[Outgoing] = deque()

    def __len__(self) -> int:
        return len(self._first) + len(self._resent)

    def _full(self, extra: int) -> bool:
        return len(self) + 1 > self.max_messages or self.nbytes + extra > self.max_bytes

    def put(self, out: Outgoing, *, resent: bool = False) -> int:
        """Queue ``out``; how many queued replies were dropped to make room (1 if ``out`` itself was)."""
        size = out.size()
        dropped = 0
        if resent:
            if self._full(size):
                return 1
            self._resent.append(out)
        else:
            while self._full(size) and (self._resent or self._first):
                victim = self._resent.popleft() if self._resent else self._first.popleft()
                self.nbytes -= victim.size()
                dropped += 1
            self._first.append(out)
        self.nbytes += size
        return dropped

    def pop(self) -> Outgoing | None:
        queue = self._first or self._resent
        if not queue:
            return None
        out = queue.popleft()
        self.nbytes -= out.size()
        return out

    def push_back(self, out: Outgoing) -> None:
        """Put back what paho could not take after all (it goes out first next time)."""
        self._first.appendleft(out)
        self.nbytes += out.size()
