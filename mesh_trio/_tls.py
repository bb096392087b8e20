"""Server-side TLS for the trio binding's plain non-blocking sockets.

A connection's task and the flusher read and write a socket without waiting
(``recv``/``send`` that raise ``BlockingIOError``), so TLS comes as an object
with those same two calls: an ``ssl.SSLObject`` over memory buffers, whose
ciphertext goes to the socket as far as it takes it. The connection's loop
is then the same with and without TLS. (``trio.SSLStream`` would need a task
waiting in every send.) The handshake runs in the connection's own task,
before the WebSocket upgrade, bounded by the upgrade's timeout.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

import trio

__all__ = ["TLSSocket"]

_READ_SIZE = 65536


class TLSSocket:
    """TLS over ``raw`` with a non-blocking socket's ``recv``, ``send``,
    ``fileno`` and ``close``.

    ``send`` takes what it is given whole into TLS; if the socket did not
    take all the ciphertext, it reports the last byte as not sent and
    remembers that it holds it, so that the caller waits until the socket is
    writable and calls again with that byte first (as it does after any short
    send): the rest of the ciphertext goes then, and the byte is not
    encrypted twice. The caller's back-pressure (wait for writable, stop
    reading, drop a slow consumer) works unchanged."""

    __slots__ = ("_held", "_in", "_out", "_pending", "_tls", "raw")

    def __init__(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        # ciphertext the socket has not taken yet: a bytearray whose taken
        # front is deleted in place, so a large buffer sent in many short
        # sends is not copied once per send
        self._pending = bytearray()
        self._held = 0  # bytes of the caller's next send already encrypted

    def fileno(self) -> int:
        return self.raw.fileno()

    async def handshake(self) -> None:
        """Complete the TLS handshake (the caller bounds it in time); raises
        ``OSError`` (``ssl.SSLError`` is one) if the peer fails it or leaves."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._drain()
                await trio.lowlevel.wait_readable(self.raw)
                try:
                    data = self.raw.recv(_READ_SIZE)
                except BlockingIOError:
                    continue
                if not data:
                    raise ConnectionResetError("the peer left during the TLS handshake") from None
                self._in.write(data)
            except ssl.SSLError:
                # the alert OpenSSL wrote (certificate required, unknown CA,
                # no shared protocol): sent if the socket takes it now, so
                # the client reads why instead of a bare end of stream
                with contextlib.suppress(OSError):
                    self._flush()
                raise
            else:
                await self._drain()  # the handshake's last flight (and session tickets)
                return

    async def _drain(self) -> None:
        self._flush()
        while self._pending:
            await trio.lowlevel.wait_writable(self.raw)
            self._flush()

    def _flush(self) -> None:
        """Send what TLS produced, as far as the socket takes it now."""
        pending = self._pending
        if self._out.pending:
            pending += self._out.read()
        if pending:
            try:
                sent = self.raw.send(pending)
            except BlockingIOError:
                return
            del pending[:sent]  # CPython moves the start: no copy of the rest

    def recv(self, size: int) -> bytes:
        """Plain bytes from what the socket has now: ``b""`` at the end (the
        peer closed, or sent close_notify), ``BlockingIOError`` when nothing
        whole came yet. Everything TLS can decrypt is returned at once, so no
        plain data waits inside TLS while the caller waits for the socket."""
        data = self.raw.recv(size)  # BlockingIOError, OSError: as a socket's
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        plain, ended = self._decrypt()
        if plain:
            return plain
        if ended or not data:
            return b""
        raise BlockingIOError

    def received_early(self) -> bytes:
        """What came with the handshake's last flight (a client may send its
        request right behind its Finished): the caller's first input, read
        before it waits for the socket, which will not signal it again."""
        return self._decrypt()[0]

    def _decrypt(self) -> tuple[bytes, bool]:
        """All the plain bytes TLS holds now, and whether the peer has ended."""
        chunks = []
        ended = False
        while True:
            try:
                chunk = self._tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True
                break
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
        self._flush()  # what reading produced (a key update's answer)
        return b"".join(chunks), ended

    def send(self, data: bytes | memoryview) -> int:
        if self._pending:
            self._flush()
            if self._pending:
                raise BlockingIOError
        held, self._held = self._held, 0
        if len(data) > held:
            self._tls.write(data[held:])
        self._flush()
        if self._pending and len(data) > 0:
            self._held = 1
            return len(data) - 1
        return len(data)

    def close(self) -> None:
        """Send close_notify if the socket takes it now, then close."""
        # the peer's close_notify would come next: not waited for
        with contextlib.suppress(ssl.SSLError, ValueError):
            self._tls.unwrap()
        if not self._pending:
            with contextlib.suppress(OSError):
                self._flush()
        self.raw.close()
