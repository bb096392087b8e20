"""The Redis store's runtime-neutral half: the shared key layout and scripts
(``_layout``), the store's logic (``_store``) over a ``RedisTransport``
(``_transport``), the Redis client itself (``_client``: pool, request FIFO
and batching in ``_connection``, pub/sub, Sentinel discovery and switch
following with ``_sentinel``), Cluster routing (``_cluster``), RESP
(``_resp``) and the URL forms (``_url``). Each runtime supplies a socket
shim (a :class:`Network`) and its :class:`~mesh_core.runtime.Runtime`.
"""

from .._errors import RedisReplyError, RedisUnavailable
from ._client import GROW_AT, RedisClient
from ._cluster import (
    SLOTS,
    ClusterEndpoint,
    ClusterTransportCore,
    NodeTransport,
    Redirect,
    SlotTable,
    Thunk,
    command_slot,
    is_cluster_url,
    key_slot,
    parse_cluster_slots,
    parse_cluster_url,
    parse_redirect,
    split_by_node,
)
from ._connection import Link, Multiplexed, Network, Stream, Waiter
from ._layout import keys
from ._resp import PING, Arg, on_pubsub_reply, pack, scan_keys
from ._sentinel import (
    ANNOUNCEMENT_TRUST,
    SWITCH_CHANNEL,
    SentinelMaster,
    SwitchState,
    parse_switch,
)
from ._store import RedisStoreCore
from ._transport import DEFAULT_URL, NodeClient, RedisTransport, open_transport
from ._url import DEFAULT_SENTINEL_PORT, RedisEndpoint, SentinelEndpoint, parse_redis_url

__all__ = [
    "ANNOUNCEMENT_TRUST",
    "Arg",
    "ClusterEndpoint",
    "GROW_AT",
    "Link",
    "Multiplexed",
    "Network",
    "RedisClient",
    "Stream",
    "Waiter",
    "ClusterTransportCore",
    "DEFAULT_URL",
    "DEFAULT_SENTINEL_PORT",
    "NodeClient",
    "NodeTransport",
    "PING",
    "Redirect",
    "RedisEndpoint",
    "RedisReplyError",
    "RedisStoreCore",
    "RedisTransport",
    "RedisUnavailable",
    "SLOTS",
    "SWITCH_CHANNEL",
    "SentinelEndpoint",
    "SentinelMaster",
    "SlotTable",
    "SwitchState",
    "Thunk",
    "command_slot",
    "is_cluster_url",
    "key_slot",
    "keys",
    "on_pubsub_reply",
    "pack",
    "scan_keys",
    "open_transport",
    "parse_cluster_slots",
    "parse_cluster_url",
    "parse_redirect",
    "parse_redis_url",
    "parse_switch",
    "split_by_node",
]
