"""What both Redis transports know about Sentinel failovers, without I/O.

A sentinel announces a failover on the ``+switch-master`` channel. The
transports subscribe to it and drop their connections to the old master at
once (it may stay writable for seconds), and for a while they trust the
announced master over a sentinel that has not heard of the failover yet.
The clock is the caller's: ``now`` is passed in.
"""

from __future__ import annotations

__all__ = ["ANNOUNCEMENT_TRUST", "SWITCH_CHANNEL", "SwitchState", "parse_switch"]

#: The channel on which a sentinel announces a failover:
#: ``<service> <old-ip> <old-port> <new-ip> <new-port>``.
SWITCH_CHANNEL = b"+switch-master"

#: How long (seconds) an announced switch outweighs a sentinel that still
#: names another master: the other sentinels learn of a failover from the one
#: that made it (within a couple of seconds); meanwhile they would send us
#: back to the old master, which still accepts writes.
ANNOUNCEMENT_TRUST = 10.0


def parse_switch(data: bytes, service: str) -> tuple[str, int] | None:
    """The new master's address in a ``+switch-master`` message about ``service``."""
    parts = data.split()
    if len(parts) != 5 or parts[0] != service.encode():
        return None
    try:
        return parts[3].decode(), int(parts[4])
    except ValueError:
        return None


class SwitchState:
    """The last switch a transport learnt of.

    ``epoch`` counts switches: a connection that remembers the epoch at
    which its address was resolved is recognised as stale (possibly talking
    to the old master) without asking anything.
    """

    __slots__ = ("epoch", "master", "trusted_until")

    def __init__(self) -> None:
        self.epoch = 0
        self.master: tuple[str, int] | None = None
        self.trusted_until = 0.0

    def announce(self, master: tuple[str, int], now: float) -> None:
        self.epoch += 1
        self.master = master
        self.trusted_until = now + ANNOUNCEMENT_TRUST

    def trusted_master(self, now: float) -> tuple[str, int] | None:
        """The announced master while it outweighs the sentinels' answers."""
        if self.master is not None and now < self.trusted_until:
            return self.master
        return None
