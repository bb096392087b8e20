"""Redis URLs, parsed once for both runtimes' transports (no I/O here).

Both transports must agree on what a URL means (which node, which
credentials go where), and a typo in a URL should fail at construction with
a message naming the problem rather than later as a confusing connection or
authentication error. Forms:

* ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://`` (TLS;
  ``?ssl_cert_reqs=none|optional|required&ssl_ca_certs=/path``);
* ``unix:///path/to/socket?db=N&password=...``;
* ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``
  ``[?sentinel_password=...&sentinel_username=...]``: the hosts are
  sentinels (default port 26379) that name the current master of
  ``service``. The credentials before ``@`` (or ``?username=``/``?password=``)
  are the master's; ``sentinel_username``/``sentinel_password`` are the
  sentinels'. ``rediss+sentinel://`` uses TLS to the master (the sentinels are
  still spoken to in clear text), with the same ``ssl_*`` options as
  ``rediss://``.

Credentials are percent-decoded (``%40`` for ``@``, ``%2C`` for ``,``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "DEFAULT_SENTINEL_PORT",
    "RedisEndpoint",
    "SentinelEndpoint",
    "parse_redis_url",
]

DEFAULT_SENTINEL_PORT = 26379

_PLAIN_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
# A misspelt option in a sentinel URL (say ``sentinel_pasword``) would otherwise
# surface only as an authentication failure at the first failover.
_SENTINEL_QUERY_KEYS = frozenset(
    {
        "db",
        "username",
        "password",
        "sentinel_username",
        "sentinel_password",
        "ssl_cert_reqs",
        "ssl_ca_certs",
    }
)
_CERT_REQS = ("none", "optional", "required")


@dataclass(frozen=True)
class RedisEndpoint:
    """One Redis node and how to talk to it (credentials, db, TLS)."""

    host: str = "localhost"
    port: int = 6379
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ssl_cert_reqs: str = "required"
    ssl_ca_certs: str | None = None

    @property
    def label(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SentinelEndpoint:
    """A Sentinel-managed master: where to ask, and how to talk to what they name.

    ``master`` carries the data node's credentials, db and TLS settings; its
    host and port are placeholders: the master moves, so a transport asks the
    sentinels for them before every connect.
    """

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    master: RedisEndpoint = field(default_factory=RedisEndpoint)
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @property
    def label(self) -> str:
        hosts = ",".join(_host_port_label(h, p) for h, p in self.sentinels)
        return f"sentinel service {self.service_name!r} via {hosts}"


def _host_port_label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_redis_url(url: str) -> RedisEndpoint | SentinelEndpoint:
    """Parse a Redis URL; raise ``ValueError`` naming what is wrong with it."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"not a Redis URL: {url!r} (expected e.g. redis://host:6379/0)")
    scheme = url.split("://", 1)[0].lower()
    if scheme in _SENTINEL_SCHEMES:
        return _parse_sentinel(url, scheme)
    if scheme not in _PLAIN_SCHEMES:
        raise ValueError(
            f"unsupported Redis URL scheme {scheme!r} "
            "(redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
            "redis+cluster://, rediss+cluster://)"
        )
    parts = urlsplit(url)
    query = _query(parts.query, url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    password = query.get("password", password)
    username = query.get("username", username)
    db_text = query.get("db")
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"unix Redis URL without a socket path: {url!r}")
        return RedisEndpoint(
            unix_path=unquote(parts.path),
            db=_db(db_text, url),
            username=username,
            password=password,
        )
    path = parts.path.lstrip("/")
    if db_text is None and path:
        db_text = path
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in Redis URL {url!r}") from None
    return RedisEndpoint(
        host=parts.hostname or "localhost",
        port=port or 6379,
        db=_db(db_text, url),
        username=username,
        password=password,
        tls=scheme == "rediss",
        ssl_cert_reqs=query.get("ssl_cert_reqs", "required").lower(),
        ssl_ca_certs=query.get("ssl_ca_certs"),
    )


def _query(text: str, url: str) -> dict[str, str]:
    try:
        return {k: v[-1] for k, v in parse_qs(text, strict_parsing=False).items() if v}
    except ValueError:
        raise ValueError(f"invalid query string in Redis URL {url!r}") from None


def _db(text: str | None, url: str) -> int:
    if text is None or text == "":
        return 0
    try:
        db = int(text)
    except ValueError:
        raise ValueError(f"database number must be an integer in Redis URL {url!r}") from None
    if db < 0:
        raise ValueError(f"database number must be >= 0 in Redis URL {url!r}")
    return db


def _parse_sentinel(url: str, scheme: str) -> SentinelEndpoint:
    rest = url.split("://", 1)[1]
    rest = rest.partition("#")[0]
    rest, _, query_text = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts_text = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon and password_text else None
    sentinels = tuple(_sentinel_address(h, url) for h in hosts_text.split(","))
    segments = path.split("/") if slash else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if not segments or not segments[0]:
        raise ValueError(
            f"Sentinel URL without a service name: {url!r} "
            "(expected redis+sentinel://host:26379/service_name[/db])"
        )
    if len(segments) > 2:
        raise ValueError(f"Sentinel URL path must be /service_name[/db]: {url!r}")
    service_name = unquote(segments[0])
    query = _query(query_text, url)
    unknown = sorted(set(query) - _SENTINEL_QUERY_KEYS)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} in Sentinel URL {url!r} "
            f"(known: {', '.join(sorted(_SENTINEL_QUERY_KEYS))})"
        )
    db_text = query.get("db", segments[1] if len(segments) == 2 else None)
    password = query.get("password", password)
    username = query.get("username", username)
    sentinel_username = query.get("sentinel_username")
    sentinel_password = query.get("sentinel_password")
    if sentinel_username is not None and sentinel_password is None:
        raise ValueError(f"sentinel_username needs sentinel_password in {url!r}")
    tls = scheme == "rediss+sentinel"
    cert_reqs = query.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)} in {url!r}")
    if not tls and ("ssl_cert_reqs" in query or "ssl_ca_certs" in query):
        raise ValueError(f"ssl_* options need rediss+sentinel:// (TLS): {url!r}")
    return SentinelEndpoint(
        sentinels=sentinels,
        service_name=service_name,
        master=RedisEndpoint(
            db=_db(db_text, url),
            username=username,
            password=password,
            tls=tls,
            ssl_cert_reqs=cert_reqs,
            ssl_ca_certs=query.get("ssl_ca_certs"),
        ),
        sentinel_username=sentinel_username,
        sentinel_password=sentinel_password,
    )


def _sentinel_address(text: str, url: str) -> tuple[str, int]:
    return _address(text, url, "sentinel", DEFAULT_SENTINEL_PORT, "26379", "in")


def _address(
    text: str, url: str, what: str, default_port: int, example_port: str, empty_in: str
) -> tuple[str, int]:
    """``host[:port]`` or ``[IPv6][:port]`` of one sentinel or cluster node."""
    text = text.strip()
    if not text:
        raise ValueError(f"empty {what} address {empty_in} {url!r}")
    port_text = ""
    if text.startswith("["):  # [IPv6]:port
        host, bracket, after = text[1:].partition("]")
        if not bracket or not host or (after and not after.startswith(":")):
            raise ValueError(f"invalid {what} address {text!r} in {url!r}")
        port_text = after[1:]
    elif text.count(":") > 1:
        raise ValueError(
            f"IPv6 {what} address {text!r} needs brackets ([::1]:{example_port}) in {url!r}"
        )
    else:
        host, _, port_text = text.partition(":")
        if not host:
            raise ValueError(f"{what} address without a host {text!r} in {url!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid {what} port {port_text!r} in {url!r}")
    return host, int(port_text)


# -- Redis Cluster (the router: mesh_core.redis._cluster)

_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_CLUSTER_QUERY_KEYS = frozenset({"username", "password", "ssl_cert_reqs", "ssl_ca_certs"})


@dataclass(frozen=True)
class ClusterEndpoint:
    """A Redis Cluster: seed nodes to learn the slot table from, and the
    settings (credentials, TLS) every node shares."""

    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ssl_cert_reqs: str | None = None
    ssl_ca_certs: str | None = None

    @property
    def label(self) -> str:
        return "cluster via " + ",".join(_host_port_label(h, p) for h, p in self.seeds)

    def node_url(self, address: tuple[str, int]) -> str:
        """The single-node URL of one node, for a runtime's own transport."""
        from urllib.parse import quote, urlencode

        host, port = address
        auth = ""
        if self.password is not None or self.username:
            user = quote(self.username or "", safe="")
            auth = f"{user}:{quote(self.password or '', safe='')}@"
        options = {"ssl_cert_reqs": self.ssl_cert_reqs, "ssl_ca_certs": self.ssl_ca_certs}
        query = urlencode({k: v for k, v in options.items() if v is not None})
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{_host_port_label(host, port)}/0" + (f"?{query}" if query else "")


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in _CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterEndpoint:
    """``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0][?...]``
    (``rediss+cluster://`` for TLS); raise ``ValueError`` naming what is wrong.

    urllib cannot split a netloc holding several hosts, hence the hand parsing.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in _CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL (redis+cluster://, rediss+cluster://): {url!r}")
    rest = url.split("://", 1)[1].partition("#")[0]
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0, not /{path}: {url!r}")
    userinfo, at, hosts_text = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon and password_text else None
    query = _query(query_text, url)
    unknown = sorted(set(query) - _CLUSTER_QUERY_KEYS)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} in Redis Cluster URL {url!r} "
            f"(known: {', '.join(sorted(_CLUSTER_QUERY_KEYS))})"
        )
    tls = scheme == "rediss+cluster"
    cert_reqs = query.get("ssl_cert_reqs")
    if cert_reqs is not None and cert_reqs.lower() not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)} in {url!r}")
    if not tls and ("ssl_cert_reqs" in query or "ssl_ca_certs" in query):
        raise ValueError(f"ssl_* options need rediss+cluster:// (TLS): {url!r}")
    return ClusterEndpoint(
        seeds=tuple(_cluster_address(h, url) for h in hosts_text.split(",")),
        username=query.get("username", username),
        password=query.get("password", password),
        tls=tls,
        ssl_cert_reqs=cert_reqs.lower() if cert_reqs is not None else None,
        ssl_ca_certs=query.get("ssl_ca_certs"),
    )


def _cluster_address(text: str, url: str) -> tuple[str, int]:
    return _address(text, url, "node", 6379, "7000", "in Redis Cluster URL")
