"""TLS: libpq's ssl* parameters reach every connection of a Store (docs/scaling.md).

A private server (tests/pg_server.py, an OpenSSL build) runs ``ssl = on``
with a certificate for ``localhost`` signed by a throwaway CA (trustme),
and asks role ``certuser`` for a client certificate (``cert``
authentication): so a pool or control connection that lost ``sslcert`` /
``sslkey`` / ``sslpassword`` (the client key is encrypted) could not log in,
one that lost ``sslrootcert`` could not verify the server, one that lost
``sslmode=verify-full`` would accept a wrong host name, and one that lost
``sslcrl`` would accept a revoked server certificate. Every backend of the
Store is then read off ``pg_stat_ssl``.
"""

from __future__ import annotations

import datetime
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme
from conftest import FAST, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from pg_server import PgServer, find_binaries

import sessionstore as ss
from sessionstore import db
from sessionstore._storage.privileges import grant_sql

# Its own PostgreSQL server: the same run on the Citus step would add nothing.
pytestmark = pytest.mark.plain_postgres

KEY_PASSPHRASE = "key-pass-Hn40"
PW_PASSWORD = "pw-user-Rt63"


@dataclass
class Tls:
    server: PgServer
    files: Path

    def params(self, crl: str = "empty.crl") -> dict[str, str]:
        """The client's TLS parameters: verify the server, present certuser's certificate."""
        return {
            "sslmode": "verify-full",
            "sslrootcert": str(self.files / "ca.pem"),
            "sslcert": str(self.files / "client.pem"),
            "sslkey": str(self.files / "client.key"),
            "sslpassword": KEY_PASSPHRASE,
            "sslcrl": str(self.files / crl),
        }

    def url(self, user: str = "certuser", host: str = "localhost", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {**self.params(), **params}.items())
        return f"postgresql://{user}@{host}:{self.server.port}/postgres?{query}"

    def keyvalue(self, **params: str) -> str:
        pairs = {
            "host": "localhost",
            "port": str(self.server.port),
            "dbname": "postgres",
            "user": "certuser",
            **self.params(),
            **params,
        }
        return " ".join(f"{k}={v}" for k, v in pairs.items())

    def backends(self, user: str) -> list[Any]:
        """(application_name, ssl, client_dn) of every backend of ``user``."""
        with psycopg.connect(self.server.admin_dsn) as conn:
            return conn.execute(
                "SELECT a.application_name, s.ssl, s.client_dn FROM pg_stat_activity a "
                "JOIN pg_stat_ssl s USING (pid) WHERE a.usename = %s ORDER BY 1",
                (user,),
            ).fetchall()


def crl(ca: trustme.CA, revoked: list[x509.Certificate]) -> bytes:
    """A CRL of ``ca`` revoking ``revoked`` (none: a valid CRL that revokes nothing)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=1))
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - datetime.timedelta(minutes=5))
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def client_files(ca: trustme.CA, server_cert: trustme.LeafCert, files: Path) -> None:
    """The CA, certuser's certificate and encrypted key, an empty CRL, one revoking the server."""
    client = ca.issue_cert("certuser", common_name="certuser")
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(KEY_PASSPHRASE.encode()),
    )
    ca.cert_pem.write_to_path(str(files / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(files / "client.pem"))
    (files / "client.key").write_bytes(encrypted)
    (files / "client.key").chmod(0o600)  # libpq refuses a key others may read
    served = x509.load_pem_x509_certificate(server_cert.cert_chain_pems[0].bytes())
    (files / "empty.crl").write_bytes(crl(ca, []))
    (files / "revoked.crl").write_bytes(crl(ca, [served]))


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost")
    server = PgServer(find_binaries(ssl=True))
    files = Path(tempfile.mkdtemp(prefix="sessionstore-tls-client-"))
    try:
        server.write("server.crt", server_cert.cert_chain_pems[0].bytes())
        server.write("server.key", server_cert.private_key_pem.bytes())
        server.write("ca.crt", ca.cert_pem.bytes())
        server.start(
            {
                "ssl": "on",
                "ssl_cert_file": f"'{server.base / 'server.crt'}'",
                "ssl_key_file": f"'{server.base / 'server.key'}'",
                "ssl_ca_file": f"'{server.base / 'ca.crt'}'",
            },
            [
                "hostssl all certuser 127.0.0.1/32 cert",
                "hostssl all pwuser 127.0.0.1/32 scram-sha-256",
            ],
        )
        client_files(ca, server_cert, files)
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute("CREATE ROLE certuser LOGIN")
            conn.execute(f"CREATE ROLE pwuser LOGIN PASSWORD '{PW_PASSWORD}'")  # type: ignore[arg-type]
        # The schema by its owner (here the superuser), the Stores on DML rights only.
        engine = db.create_engine(server.admin_dsn, pool_size=1)
        try:
            db.ensure_schema(engine, "sessionstore")
        finally:
            engine.dispose()
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            for role in ("certuser", "pwuser"):
                conn.execute(grant_sql("sessionstore", role))  # type: ignore[arg-type]
        yield Tls(server, files)
    finally:
        server.stop()
        for path in files.iterdir():
            path.unlink()
        files.rmdir()


def store_on(dsn: str, **options: Any) -> ss.Store:
    settings = {**FAST, "name": f"t{uuid.uuid4().hex[:8]}", **options}
    return ss.Store(template={"coins": 0}, dsn=dsn, **settings)


@pytest.mark.parametrize("form", ["url", "keyvalue"])
def test_every_connection_of_a_store_is_verified_tls(tls: Tls, form: str) -> None:
    app = f"tls-{uuid.uuid4().hex[:8]}"
    dsn = tls.url(application_name=app) if form == "url" else tls.keyvalue(application_name=app)
    with store_on(dsn, instant_takeover=True) as store:
        store.load("k")
        store.update("k", lambda d: d.update(coins=1) or True, durable=True)
        store.save("k")
        rows = wait_until(
            lambda: (
                (found := tls.backends("certuser"))
                and {row[0] for row in found} >= {app, "sessionstore-control"}
                and found
            ),
            5.0,
            "the pool's and the control connection's backends",
        )
        # Every backend of the role (pool and control connection): encrypted,
        # and logged in with certuser's certificate (so sslcert, sslkey and
        # sslpassword reached it; verify-full with sslrootcert got it there).
        assert {row[0] for row in rows} == {app, "sessionstore-control"}, rows
        assert all(row[1] is True and row[2].endswith("/CN=certuser") for row in rows), rows


def test_verify_full_refuses_a_wrong_host_name(tls: Tls) -> None:
    """The certificate names ``localhost``; the same server as 127.0.0.1 is refused."""
    dsn = tls.url("pwuser:" + PW_PASSWORD, host="127.0.0.1")
    started = time.monotonic()
    with pytest.raises(ss.StorageUnavailableError) as caught:
        store_on(dsn, retry_timeout=1.0)
    assert time.monotonic() - started < 10.0
    message = str(caught.value)
    assert 'server certificate for "localhost" does not match host name "127.0.0.1"' in message
    assert PW_PASSWORD not in message and KEY_PASSPHRASE not in message
    assert not isinstance(caught.value, ss.InsufficientPrivilegeError)


def test_the_control_connection_verifies_its_host_name_too(tls: Tls) -> None:
    control = tls.keyvalue(user="pwuser", password=PW_PASSWORD, host="127.0.0.1")
    with pytest.raises(ss.StorageUnavailableError) as caught:
        store_on(tls.url(), control_dsn=control, retry_timeout=1.0)
    message = str(caught.value)
    assert "control connection failed" in message
    assert 'does not match host name "127.0.0.1"' in message
    assert PW_PASSWORD not in message and KEY_PASSPHRASE not in message


def test_a_revoked_server_certificate_is_refused_by_pool_and_control(tls: Tls) -> None:
    """The same parameters with the empty CRL connect (above): the CRL makes the difference.

    (libpq says only "certificate verify failed", not why.)
    """
    with pytest.raises(
        ss.StorageUnavailableError, match="SSL error: certificate verify failed"
    ) as caught:
        store_on(tls.url(sslcrl=str(tls.files / "revoked.crl")), retry_timeout=1.0)
    assert "control connection" not in str(caught.value)  # the pool's first connection
    revoked = tls.keyvalue(sslcrl=str(tls.files / "revoked.crl"))
    with pytest.raises(
        ss.StorageUnavailableError, match="SSL error: certificate verify failed"
    ) as caught:
        store_on(tls.url(), control_dsn=revoked, retry_timeout=1.0)
    assert "control connection failed" in str(caught.value)
    assert KEY_PASSPHRASE not in str(caught.value)
