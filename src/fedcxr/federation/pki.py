"""The federation's PKI: a CA, the aggregator's server certificate and one client cert per site."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcxr.federation.certs import (
    ROLES,
    SERVER_DEFAULT_HOSTS,
    PkiError,
    Role,
    build_ca,
    build_leaf,
    check_common_name,
    describe,
    encode_key,
    key_matches,
    load_cert,
    load_key,
    new_key,
    split_hosts,
    verify_chain,
)
from fedcxr.federation.certs import fingerprint as fingerprint  # re-exported for server.py

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
DEFAULT_CA_NAME = "fedcxr federation CA"


@dataclass(frozen=True)
class CaFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class IssuedFiles:
    common_name: str
    role: Role
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class TlsBundle:
    """PEM bytes as grpc wants them: root_certificates, private_key, certificate_chain."""

    root_certificates: bytes
    private_key: bytes
    certificate_chain: bytes


# ---------------------------------------------------------------- file I/O


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a temporary file created with `mode`, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} not found: expected {path}") from None


def _read_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    cert_pem = _read(cert_path, "CA certificate")
    key_pem = _read(key_path, "CA private key")
    cert = load_cert(cert_pem, str(cert_path))
    key = load_key(key_pem, key_path)
    if not key_matches(cert, key):
        raise PkiError(f"{key_path} is not the private key of {cert_path}")
    return cert, key


def init_ca(
    folder: Path,
    name: str = DEFAULT_CA_NAME,
    days: int = 3650,
    *,
    force: bool = False,
    now: dt.datetime | None = None,
) -> CaFiles:
    """Create the federation CA: `ca.pem` (certificate) and `ca.key` (private key, mode 0600).

    Refuses to replace an existing CA unless `force`: every certificate it issued would stop
    being accepted.
    """
    folder = Path(folder)
    files = CaFiles(cert=folder / CA_CERT, key=folder / CA_KEY)
    if not force:
        for path in (files.cert, files.key):
            if path.exists():
                raise PkiError(
                    f"{path} already exists: refusing to replace the federation CA "
                    f"(certificates it issued would stop working); use force=True / --force"
                )
    folder.mkdir(parents=True, exist_ok=True)
    key = new_key()
    cert = build_ca(key, name, days, now or dt.datetime.now(dt.UTC))
    _write_atomic(files.key, encode_key(key), 0o600)
    _write_atomic(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def issue(
    folder: Path,
    common_name: str,
    role: Role,
    hosts: Sequence[str] = (),
    days: int = 825,
    *,
    out: Path | None = None,
    force: bool = False,
    now: dt.datetime | None = None,
) -> IssuedFiles:
    """Sign a new key pair for `common_name` with the CA in `folder`; write `<cn>.pem`, `<cn>.key`.

    The files go to `out` (default: `folder`); the key is written with mode 0600. Refuses to
    replace existing files unless `force`.
    """
    folder = Path(folder)
    check_common_name(common_name)
    if role not in ROLES:
        raise PkiError(f"invalid role {role!r}: expected one of {list(ROLES)}")
    out = Path(out) if out is not None else folder
    files = IssuedFiles(
        common_name=common_name,
        role=role,
        cert=out / f"{common_name}.pem",
        key=out / f"{common_name}.key",
        ca=folder / CA_CERT,
    )
    if not force:
        for path in (files.cert, files.key):
            if path.exists():
                raise PkiError(
                    f"{path} already exists: refusing to replace the {role} credentials of "
                    f"{common_name!r}; use force=True / --force"
                )
    ca_cert, ca_key = _read_ca(folder)
    key = new_key()
    cert = build_leaf(
        ca_cert,
        ca_key,
        key.public_key(),
        common_name,
        role,
        hosts,
        days,
        now or dt.datetime.now(dt.UTC),
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(files.key, encode_key(key), 0o600)
    _write_atomic(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def load_bundle(folder: Path, common_name: str, *, ca: Path | None = None) -> TlsBundle:
    """Read and pre-flight `<cn>.pem`, `<cn>.key` and the CA from `folder`, as bytes for grpc.

    Server: `grpc.ssl_server_credentials([(b.private_key, b.certificate_chain)],
    root_certificates=b.root_certificates, require_client_auth=True)`.
    Site: `grpc.ssl_channel_credentials(b.root_certificates, b.private_key, b.certificate_chain)`.
    """
    folder = Path(folder)
    check_common_name(common_name)
    cert_path, key_path = folder / f"{common_name}.pem", folder / f"{common_name}.key"
    ca_path = Path(ca) if ca is not None else folder / CA_CERT
    ca_pem = _read(ca_path, "CA certificate")
    cert_pem = _read(cert_path, f"certificate of {common_name!r}")
    key_pem = _read(key_path, f"private key of {common_name!r}")
    cert = load_cert(cert_pem, str(cert_path))
    if not key_matches(cert, load_key(key_pem, key_path)):
        raise PkiError(f"{key_path} is not the private key of {cert_path}")
    try:
        verify_chain(cert_pem, ca_pem)
    except PkiError as exc:
        raise PkiError(f"{cert_path} against {ca_path}: {exc}") from None
    return TlsBundle(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


def _usable(files: IssuedFiles, ca_pem: bytes, hosts: Sequence[str]) -> bool:
    """True if the existing files are a matching pair, chained to the CA, in date, hosts covered."""
    if not (files.cert.is_file() and files.key.is_file()):
        return False
    try:
        cert_pem = files.cert.read_bytes()
        cert = load_cert(cert_pem, str(files.cert))
        if not key_matches(cert, load_key(files.key.read_bytes(), files.key)):
            return False
        verify_chain(cert_pem, ca_pem)
    except PkiError:
        return False
    info = describe(cert_pem)
    wanted = "serverAuth" if files.role == "server" else "clientAuth"
    if info.usages != (wanted,) or info.common_name != files.common_name:
        return False
    if files.role == "server":
        dns, ips = split_hosts([*SERVER_DEFAULT_HOSTS, *hosts])
        have_ips = {ipaddress.ip_address(ip) for ip in info.ip_addresses}
        return set(dns) <= set(info.dns_names) and set(ips) <= have_ips
    return True


def ensure_federation(
    folder: Path,
    sites: Sequence[str],
    server_cn: str = "aggregator",
    *,
    hosts: Sequence[str] = (),
    days: int = 825,
) -> dict[str, IssuedFiles]:
    """Make sure `folder` holds a CA, the server's credentials and one per site; return them all.

    Idempotent: existing credentials are kept. A CA is created only if neither ca.pem nor
    ca.key exists; a leaf is (re)issued when it is missing, does not match its key, was not
    signed by this CA, is out of date, has the wrong role, or lacks one of `hosts`.
    The result maps common name -> files, server first.
    """
    folder = Path(folder)
    names = [check_common_name(server_cn), *(check_common_name(s) for s in sites)]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise PkiError(
                f"common name {name!r} appears twice among server {server_cn!r} and "
                f"sites {list(sites)}; every participant needs its own"
            )
        seen.add(name)
    split_hosts(hosts)  # fail early on a bad host, before anything is written
    ca_cert, ca_key = folder / CA_CERT, folder / CA_KEY
    if not ca_cert.exists() and not ca_key.exists():
        init_ca(folder)
    _read_ca(folder)  # both present, readable and matching (else a clear error)
    ca_pem = ca_cert.read_bytes()
    result: dict[str, IssuedFiles] = {}
    for name in names:
        role: Role = "server" if name == server_cn else "site"
        wanted = IssuedFiles(
            common_name=name,
            role=role,
            cert=folder / f"{name}.pem",
            key=folder / f"{name}.key",
            ca=ca_cert,
        )
        if _usable(wanted, ca_pem, hosts if role == "server" else ()):
            result[name] = wanted
        else:
            result[name] = issue(
                folder, name, role, hosts if role == "server" else (), days, force=True
            )
    return result
