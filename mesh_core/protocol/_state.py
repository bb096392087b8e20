"""The connection states of both roles, and which API call is valid in which.

In the manner of h11's ``_state.py``: the calls that move a connection from
one state to another are a table, read on its own. Each entry maps a call to
``{state it is valid in: the state it leads to}``, plus the states in which
it is merely *late* and ignored: the connection already closed under the
caller (the peer left, a timeout fired, the server closed it) while the
caller was awaiting something, which is a race, not a bug. Any other state
means the caller misused the API: :class:`~mesh_core.protocol.LocalProtocolError`.

Transitions driven by the peer or by timers (a close frame, a lost socket, a
handshake timeout) are not API calls: the machines make them where the input
is read, and they only ever lead towards ``CLOSING``/``CLOSED``.

Decided per method, the other calls are in no table because they are valid
in every state: ``close()`` (a no-op once closing: the application, a
shutdown and the peer may all want a connection gone at once); the server's
``send_message``/``send_push``/``respond`` (they return ``False`` unless
OPEN: a broadcast or a late response meets closing connections all the
time); ``receive_data``/``tick`` (input after the end is dropped) and
``request_done`` (a request may finish after its connection closed).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from .._errors import LocalProtocolError

__all__ = [
    "CLIENT_CALLS",
    "SERVER_CALLS",
    "Call",
    "ClientState",
    "State",
    "transition",
]


class State(enum.Enum):
    """A server connection::

    HANDSHAKE --accept()--> OPENING --opened()--> OPEN --close()/peer close--> CLOSING/CLOSED
        \\--reject()/bad HTTP--> CLOSED
    """

    HANDSHAKE = "handshake"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class ClientState(enum.Enum):
    """A client connection::

    IDLE --initiate()--> CONNECTING --accepted--> OPENING --mesh/assign-id--> OPEN
        --close()--> CLOSING --> CLOSED
    CONNECTING --HTTP rejection--> CLOSED; peer close / socket lost --> CLOSED
    """

    IDLE = "idle"
    CONNECTING = "connecting"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


S = TypeVar("S", State, ClientState)


@dataclass(frozen=True, slots=True)
class Call(Generic[S]):
    """One API call: the states it is valid in (and where each leads), and
    the states in which it arrives too late and does nothing."""

    valid: Mapping[S, S]
    late: frozenset[S] = frozenset()


SERVER_CALLS: Final[Mapping[str, Call[State]]] = {
    # the server answers the upgrade after awaiting authentication: the peer
    # may have left (or the handshake timed out) by then
    "accept": Call({State.HANDSHAKE: State.OPENING}, frozenset({State.CLOSED})),
    "reject": Call({State.HANDSHAKE: State.CLOSED}, frozenset({State.CLOSED})),
    # registration and the connect hooks ran: a hook, the peer or a shutdown
    # may have closed the connection meanwhile
    "opened": Call({State.OPENING: State.OPEN}, frozenset({State.CLOSING, State.CLOSED})),
}

CLIENT_CALLS: Final[Mapping[str, Call[ClientState]]] = {
    "initiate": Call({ClientState.IDLE: ClientState.CONNECTING}),
    # a request needs an id the server will answer: only once OPEN
    "send_request": Call({ClientState.OPEN: ClientState.OPEN}),
}


def transition(calls: Mapping[str, Call[S]], name: str, state: S) -> S | None:
    """The state ``name`` called in ``state`` leads to; ``None`` if the call
    came too late and must do nothing. Raises :class:`LocalProtocolError`
    for a call that is not valid in ``state``."""
    call = calls[name]
    after = call.valid.get(state)
    if after is not None:
        return after
    if state in call.late:
        return None
    raise LocalProtocolError(f"{name}() is not valid while the connection is {state.value}")
