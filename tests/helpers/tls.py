"""Certificates the TLS tests make for themselves, with the system's
``openssl``: a CA, a server certificate for ``localhost`` and ``127.0.0.1``
signed by it, a client certificate signed by it, and a client certificate
signed by a CA the server does not trust."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Certs", "OPENSSL", "make_certs"]

OPENSSL = shutil.which("openssl")

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_CA_EXT = [
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    "-addext", "subjectKeyIdentifier=hash",
]  # fmt: skip
_LEAF_EXT = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
"""


@dataclass(frozen=True)
class Certs:
    dir: Path
    ca: Path  # the CA that signed the server's and the client's certificates
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from a CA the server does not trust
    stranger_key: Path

    def client_context(self, with_cert: bool = False, stranger: bool = False) -> ssl.SSLContext:
        """A client's context that trusts the test CA (and presents a certificate)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        if stranger:
            context.load_cert_chain(str(self.stranger_cert), str(self.stranger_key))
        return context


def _run(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    _run("req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
         "-subj", f"/CN=Mesh test {name}", *_CA_EXT, cwd=directory)  # fmt: skip


def _leaf(directory: Path, name: str, ca: str, usage: str, san: str = "") -> None:
    ext = directory / f"{name}.ext"
    ext.write_text(
        _LEAF_EXT + f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" * bool(san))
    )
    _run("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
         cwd=directory)  # fmt: skip
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
         "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name,
         cwd=directory)  # fmt: skip


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _leaf(directory, "server", "ca", "serverAuth", "DNS:localhost,IP:127.0.0.1,IP:::1")
    _leaf(directory, "client", "ca", "clientAuth")
    _leaf(directory, "stranger", "other-ca", "clientAuth")
    d = directory
    return Certs(d, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                 d / "client.key", d / "stranger.pem", d / "stranger.key")  # fmt: skip
