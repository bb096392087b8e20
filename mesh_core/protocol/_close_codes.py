"""The WebSocket close codes (RFC 6455 section 7.4.1) both roles send.

One enum for both connection machines, so a code is named the same wherever
it is chosen. It is an ``IntEnum``: a code compares equal to its number, and
a peer's code outside this list (any 3000-4999 application code) still
travels as a plain ``int``.
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode"]


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    #: never on the wire: the socket went away without a closing handshake
    ABNORMAL = 1006
    #: a text message that is not UTF-8 (wsproto detects it and answers)
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
