"""The Redis store's runtime-neutral half: the shared key layout and scripts,
the store's logic over a ``RedisTransport``, RESP encoding, Sentinel switch
following, Cluster routing and the URL forms. The adapters supply the sockets.
"""

from .._errors import RedisReplyError, RedisUnavailable
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
from ._resp import PING, Arg, forget_channel, on_pubsub_reply, pack
from ._sentinel import ANNOUNCEMENT_TRUST, SWITCH_CHANNEL, SwitchState, parse_switch
from ._store import RedisStoreCore, RedisTransport, keys
from ._url import DEFAULT_SENTINEL_PORT, RedisEndpoint, SentinelEndpoint, parse_redis_url

__all__ = [
    "ANNOUNCEMENT_TRUST",
    "Arg",
    "ClusterEndpoint",
    "ClusterTransportCore",
    "DEFAULT_SENTINEL_PORT",
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
    "SlotTable",
    "SwitchState",
    "Thunk",
    "command_slot",
    "forget_channel",
    "is_cluster_url",
    "key_slot",
    "keys",
    "on_pubsub_reply",
    "pack",
    "parse_cluster_slots",
    "parse_cluster_url",
    "parse_redirect",
    "parse_redis_url",
    "parse_switch",
    "split_by_node",
]
