"""Channel history in the in-memory store: the kept messages, offsets and
epoch of each channel (``WriteChannel`` / ``GetChannelHistory``).

The rules are those of the Redis scripts in :mod:`mesh_core.redis._channels`;
:func:`plan_read` is the read decision both follow, in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import _ops as ops

__all__ = ["MemoryChannels", "plan_read"]


def plan_read(
    length: int,
    last: int,
    known: int,
    epoch: str | None,
    op: ops.GetChannelHistory,
    floor: int = 0,
) -> tuple[int, bool | None]:
    """How many of the newest kept messages to return, and ``recovered``.

    ``length`` messages are kept; the newest ``known`` of them have the
    offsets ``last - known + 1 .. last`` (older ones, or a reference writer's,
    have none); ``floor`` is the first offset written after messages without
    one (0: none). Without ``since``: the latest ``limit``. With ``since``:
    the messages after it that have an offset, at most the latest ``limit``
    (so nothing is ever given twice), and ``recovered`` only if that is
    every message written after it: same epoch, ``since`` not ahead of
    ``last`` nor before ``floor``, nothing newer without an offset, all of
    them kept and within ``limit``. Another epoch (or ``since`` ahead): a
    different history, whose latest ``limit`` are all new to the reader."""
    limit = op.limit
    if op.since is None:
        return min(limit, length), None
    same_epoch = op.epoch is None or op.epoch == epoch
    if not same_epoch or op.since > last:
        return min(limit, length), False
    missing = last - op.since
    foreign = length > 0 and known == 0
    complete = missing <= known and missing <= limit and op.since >= floor and not foreign
    return min(missing, known, limit), complete


@dataclass
class _History:
    messages: list[str] = field(default_factory=list)
    last: int = 0
    epoch: str | None = None


class MemoryChannels:
    """The channel handlers of :class:`~mesh_core.storage.MemoryStore` (a
    mixin: the handler table is read from the driver's own methods). In one
    process nothing writes without offsets, so every kept message has one."""

    def __init__(self) -> None:
        self._histories: dict[str, _History] = {}

    def _publish_message(self, op: ops.PublishMessage) -> None:
        raise NotImplementedError  # MemoryStore's

    def _write_channel(self, op: ops.WriteChannel) -> tuple[int, str]:
        history = self._histories.setdefault(op.channel, _History())
        if history.epoch is None:
            history.epoch = op.epoch
        history.last += 1
        history.messages.append(op.message)
        del history.messages[: -op.history]
        data = op.message.encode()
        envelope = ops.offsets_envelope(history.last, history.epoch, data)
        self._publish_message(ops.PublishMessage(ops.offsets_channel(op.channel), envelope))
        self._publish_message(ops.PublishMessage(op.channel, data))
        return history.last, history.epoch

    def _get_channel_history(self, op: ops.GetChannelHistory) -> ops.ChannelHistory:
        history = self._histories.get(op.channel) or _History()
        kept = history.messages
        count, recovered = plan_read(len(kept), history.last, len(kept), history.epoch, op)
        messages = kept[len(kept) - count :] if count else []
        return ops.ChannelHistory(
            messages, history.last if messages else None, history.last, history.epoch, recovered
        )
