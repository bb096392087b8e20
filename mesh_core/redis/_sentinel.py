"""Sentinel: finding the master of a service, and following its failovers.

A sentinel announces a failover on the ``+switch-master`` channel. The
client subscribes to it and drops its connections to the old master at once
(it may stay writable for seconds), and for a while it trusts the announced
master over a sentinel that has not heard of the failover yet
(:class:`SwitchState`, pure; the clock is passed in). :class:`SentinelMaster`
does the asking and listening over the runtime's :class:`Network`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import hiredis

from .._errors import RedisUnavailable
from ..runtime import Runtime
from ._connection import (
    Backoff,
    Network,
    Stream,
    addr_label,
    check_replies,
    exchange,
    new_reader,
    parse_master_address,
    sentinel_auth,
    serve_subscription,
)
from ._url import RedisEndpoint, SentinelEndpoint

__all__ = [
    "ANNOUNCEMENT_TRUST",
    "SWITCH_CHANNEL",
    "OpenNode",
    "SentinelMaster",
    "SwitchState",
    "parse_switch",
]

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


# -------------------------------------------------- finding and following the master

#: ``open_node(endpoint)``: a connected, authenticated stream to a node that
#: said ``ROLE`` master (the client's handshake), and its reply reader
OpenNode = Callable[[RedisEndpoint], Awaitable[tuple[Stream, hiredis.Reader]]]


class SentinelMaster:
    """The master of a Sentinel service, for one client: asking the
    sentinels, connecting to what they name, and following its switches.

    Before every connect the sentinels are asked in turn
    ``SENTINEL get-master-addr-by-name``, and the node they name must say
    ``ROLE`` master, else the next sentinel is asked. :meth:`listen` stays
    subscribed to ``+switch-master`` on one sentinel (the next one if it
    dies) and, the moment a switch is announced, calls ``on_moved(master,
    why)``: the client then drops every connection to another node. A
    connect that raced with an announcement is redone. Switches announced
    while nobody listened are caught by asking the sentinels once it listens
    again.
    """

    def __init__(
        self,
        target: SentinelEndpoint,
        *,
        runtime: Runtime,
        network: Network,
        open_node: OpenNode,
        on_moved: Callable[[tuple[str, int], str], None],
        log: logging.Logger,
        connect_timeout: float,
        command_timeout: float,
        health_check_interval: float | None,
        reconnect_backoff: tuple[float, float],
    ) -> None:
        self.target = target
        self._rt = runtime
        self._net = network
        self._open_node = open_node
        self._on_moved = on_moved
        self._log = log
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._health_check_interval = health_check_interval
        self._reconnect_backoff = reconnect_backoff
        self.sentinels = list(target.sentinels)  # the last one that answered first
        #: the master we talk to (None before the first connect)
        self.address: tuple[str, int] | None = None
        # counts the changes of ``address``: a connect that began before a
        # change may have reached the old master
        self.epoch = 0
        self.switch = SwitchState()  # the last +switch-master heard, trusted for a while

    @property
    def attempt_timeout(self) -> float:
        """Bound on one connect: it may ask every sentinel (connect + one
        command each) before connecting to the master it names."""
        per_sentinel = self._connect_timeout + self._command_timeout
        return len(self.sentinels) * per_sentinel + self._connect_timeout

    async def open(self) -> tuple[Stream, hiredis.Reader, str, tuple[str, int]]:
        """A connected, authenticated stream to the current master, its label and address."""
        for _ in range(3):
            epoch = self.epoch
            stream, reader, label, master = await self._open_master()
            if epoch == self.epoch or master == self.address:
                if self.address != master:
                    self.moved(master, "named by the sentinels")
                return stream, reader, label, master
            # A switch to another node was announced while we connected: this
            # may be the old master, still accepting writes. Ask again.
            stream.close()
        raise RedisUnavailable(f"the master of {self.target.label} kept moving")

    async def _open_master(self) -> tuple[Stream, hiredis.Reader, str, tuple[str, int]]:
        """Ask each sentinel in turn for the master, connect to it, check it is one."""
        problems: list[str] = []
        for address in list(self.sentinels):
            label = addr_label(address)
            try:
                async with self._rt.timeout(self._connect_timeout + self._command_timeout):
                    master = await self.ask(address)
            except TimeoutError:
                problems.append(f"sentinel {label} did not answer in time")
                continue
            except RedisUnavailable as exc:
                problems.append(str(exc))
                continue
            if master is None:
                problems.append(f"sentinel {label} knows no master {self.target.service_name!r}")
                continue
            announced = self._trusted_announcement()
            if announced is not None and master != announced:
                self._log.debug(
                    "sentinel %s still names %s; %s was announced", label, master, announced
                )
                master = announced
            ep = replace(self.target.master, host=master[0], port=master[1])
            try:
                async with self._rt.timeout(self._connect_timeout):
                    stream, reader = await self._open_node(ep)
            except TimeoutError:
                problems.append(f"master {ep.label} (from sentinel {label}) did not answer in time")
                continue
            except RedisUnavailable as exc:
                problems.append(f"{exc} (named by sentinel {label})")
                continue
            if self.sentinels[0] != address:  # ask the one that answered first next time
                self.sentinels.remove(address)
                self.sentinels.insert(0, address)
            return stream, reader, ep.label, master
        raise RedisUnavailable(f"no Redis master for {self.target.label}: {'; '.join(problems)}")

    async def ask(self, address: tuple[str, int]) -> tuple[str, int] | None:
        """The master the sentinel at ``address`` names (None: it knows none)."""
        label = addr_label(address)
        try:
            async with self._rt.timeout(self._connect_timeout):
                stream = await self._net.open(*address)
        except OSError as exc:  # (TimeoutError is one)
            raise RedisUnavailable(f"cannot connect to sentinel {label}: {exc!r}") from exc
        commands = sentinel_auth(self.target)
        commands.append(("SENTINEL", "get-master-addr-by-name", self.target.service_name))
        try:
            async with self._rt.timeout(self._command_timeout):
                replies = await exchange(stream, new_reader(), commands)
        except TimeoutError:
            raise RedisUnavailable(f"sentinel {label} did not answer in time") from None
        except (OSError, EOFError, hiredis.ProtocolError) as exc:
            raise RedisUnavailable(f"sentinel {label}: connection lost: {exc!r}") from exc
        finally:
            stream.close()
        check_replies(f"sentinel {label}", commands, replies)
        return parse_master_address(label, replies[-1])

    def moved(self, master: tuple[str, int], why: str) -> None:
        """The master is known to be ``master``: the client drops every
        connection to another node at once. They would otherwise keep
        talking to the old master until it is demoted (which Sentinel may do
        only seconds after the failover), and writes made there meanwhile
        would be lost."""
        previous, self.address = self.address, master
        if previous != master:
            self.epoch += 1  # a connect that began before may have reached the old master
            self._log.info(
                "Redis master for %s is now %s (%s)", self.target.label, addr_label(master), why
            )
        self._on_moved(master, why)

    def _trusted_announcement(self) -> tuple[str, int] | None:
        return self.switch.trusted_master(self._rt.now())

    def _announced(self, master: tuple[str, int], why: str) -> None:
        self.switch.announce(master, self._rt.now())
        self.moved(master, why)

    async def listen(self) -> None:
        """Stay subscribed to ``+switch-master`` on one sentinel, the next one if it fails."""
        backoff = Backoff(self._rt, *self._reconnect_backoff)
        turn = 0
        while True:
            address = self.target.sentinels[turn % len(self.target.sentinels)]
            try:
                await self._listen_on(address)  # (ends by raising: a lost connection)
            except (OSError, EOFError, hiredis.ProtocolError, RedisUnavailable) as exc:
                self._log.debug("listening for failovers on sentinel %s failed: %r", address, exc)
            except Exception:
                self._log.exception("listening for failovers on sentinel %s failed", address)
            turn += 1
            await backoff.sleep()

    async def _listen_on(self, address: tuple[str, int]) -> None:
        """Serve one subscription until it breaks."""
        label = addr_label(address)
        async with self._rt.timeout(self._connect_timeout):
            stream = await self._net.open(*address)
        try:
            reader = new_reader()
            commands = sentinel_auth(self.target)
            commands.append(("SUBSCRIBE", SWITCH_CHANNEL))
            async with self._rt.timeout(self._command_timeout):
                replies = await exchange(stream, reader, commands)
            check_replies(f"sentinel {label}", commands, replies)
            self._log.debug("listening for failovers on sentinel %s", label)
            # a switch announced while nobody listened is caught up with now
            await self._check_master(address)

            def on_reply(msg: Any) -> None:
                if type(msg) is list and len(msg) == 3 and msg[0] == b"message":
                    master = parse_switch(msg[2], self.target.service_name)
                    if master is not None:
                        self._announced(master, f"announced by sentinel {label}")

            await serve_subscription(
                self._rt,
                stream,
                reader,
                f"sentinel {label}",
                on_reply,
                interval=self._health_check_interval,
                timeout=self._command_timeout,
            )
        finally:
            stream.close()

    async def _check_master(self, address: tuple[str, int]) -> None:
        """Follow the master the sentinel names now, if it is not the one we talk to."""
        if self.address is None:
            return  # not connected yet: the first connect asks the sentinels anyway
        try:
            master = await self.ask(address)
        except RedisUnavailable as exc:
            self._log.debug("asking sentinel %s for the master failed: %r", address, exc)
            return
        announced = self._trusted_announcement()
        if master is not None and master != self.address and announced in (None, master):
            self._announced(master, f"named by sentinel {addr_label(address)}")
