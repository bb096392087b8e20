"""Storage, as data: the operations the core emits (``_ops``), the merge
strategies (pure functions), the ``Storage`` protocol every driver implements
(``_base``: ``execute``, ``start``/``run``/``detach``/``stop`` and the
``answers_inline`` capability), and the in-memory driver (``_memory``). A
storage author implements ``Storage`` and runs
``tests/helpers/storage_conformance.py`` against it.

A new capability (presence, channels, records) adds its operations as
frozen dataclasses in ``_ops`` (with their handler names in its table), and
one handler per operation in each driver; the server and its built-ins only
ever yield or execute operations.
"""

from ._base import DeliverCallback, Storage
from ._memory import MemoryStore
from ._ops import (
    HANDLER_NAMES,
    UNCHANGED,
    AddToRoom,
    ClearRoom,
    DeleteRoom,
    DeleteRoomMetadata,
    GetAllConnectionIds,
    GetAllMetadata,
    GetAllRooms,
    GetConnectionRooms,
    GetMetadata,
    GetRoomMembers,
    GetRoomMembersMetadata,
    IsInRoom,
    MessageCallback,
    Op,
    Publish,
    PublishMessage,
    RegisterConnection,
    RemoveFromRoom,
    Scope,
    Subscribe,
    UnknownConnection,
    UnregisterConnection,
    Unsubscribe,
    UpdateMetadata,
    handlers,
)
from ._strategies import STRATEGIES, Strategy, apply_strategy, deep_merge, merge, replace, updater

__all__ = [
    "AddToRoom",
    "ClearRoom",
    "DeleteRoom",
    "DeleteRoomMetadata",
    "DeliverCallback",
    "GetAllConnectionIds",
    "GetAllMetadata",
    "GetAllRooms",
    "GetConnectionRooms",
    "GetMetadata",
    "GetRoomMembers",
    "GetRoomMembersMetadata",
    "HANDLER_NAMES",
    "IsInRoom",
    "MemoryStore",
    "MessageCallback",
    "Op",
    "Publish",
    "PublishMessage",
    "RegisterConnection",
    "RemoveFromRoom",
    "STRATEGIES",
    "Scope",
    "Storage",
    "Strategy",
    "Subscribe",
    "UNCHANGED",
    "UnknownConnection",
    "UnregisterConnection",
    "Unsubscribe",
    "UpdateMetadata",
    "apply_strategy",
    "deep_merge",
    "handlers",
    "merge",
    "replace",
    "updater",
]
