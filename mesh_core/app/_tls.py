"""A server's TLS context from certificate files (``mesh serve --ssl-*``,
``MeshServer.tls_context``), with the one-line errors of a failed start.

The core imports no ``ssl``: the adapter hands in how to make an empty
server-side context (``ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)``)
and the loading, the client-certificate rule and the messages are written
once, here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .._errors import ServerStartupError
from ..runtime import TLSContext

__all__ = ["load_server_tls"]

#: ``ssl.CERT_REQUIRED``, reached through the context's own enum
_CERT_REQUIRED = 2


def _why(exc: OSError) -> str:
    """An ``ssl.SSLError``'s text without OpenSSL's source location."""
    text = str(exc.strerror or exc)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)


def _unreadable(flag: str, path: str) -> ServerStartupError | None:
    """The error for a file that cannot be opened, if ``path`` is one."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return ServerStartupError(f"TLS: cannot read {flag} {path!r}: {exc.strerror or exc}")


def load_server_tls(
    new_context: Callable[[], TLSContext],
    certfile: str,
    keyfile: str | None = None,
    password: str | None = None,
    ca_certs: str | None = None,
) -> TLSContext:
    """A server context serving ``certfile`` (with ``keyfile``, or the key in
    ``certfile``); with ``ca_certs``, every client must present a certificate
    signed by one of its CAs (``CERT_REQUIRED``), else its handshake fails.

    Raises :class:`ServerStartupError` naming the file and the flag at fault:
    a missing or unreadable file, a file that is not PEM, a key that does not
    match the certificate, a wrong password."""
    files = [("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile), ("--ssl-ca-certs", ca_certs)]
    for flag, path in files:
        error = _unreadable(flag, path) if path is not None else None
        if error is not None:
            raise error
    context = new_context()
    loader: Any = context  # an ssl.SSLContext: its loading methods
    if ca_certs is not None:
        try:
            loader.load_verify_locations(cafile=ca_certs)
        except OSError as exc:
            raise ServerStartupError(
                f"TLS: --ssl-ca-certs {ca_certs!r} holds no CA certificate: {_why(exc)}"
            ) from exc
        context.verify_mode = type(context.verify_mode)(_CERT_REQUIRED)
    try:
        loader.load_cert_chain(certfile, keyfile, password)
    except OSError as exc:
        key = keyfile or certfile
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            message = f"the key {key!r} does not match the certificate {certfile!r}"
        else:
            message = (
                f"cannot load the certificate {certfile!r} with the key {key!r}: {_why(exc)} "
                "(PEM files expected; is --ssl-keyfile-password right?)"
            )
        raise ServerStartupError(f"TLS: {message}") from exc
    return context
