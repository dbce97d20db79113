"""The federation's PKI: a CA, the aggregator's server certificate and one client cert per site."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Role = Literal["site", "server"]
ROLES: tuple[Role, ...] = ("site", "server")
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
DEFAULT_CA_NAME = "fedcxr federation CA"
# Lower-case DNS-label-like names; "ca" is taken by the CA's own files.
COMMON_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_USAGE_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}
SERVER_DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
# Certificates start a little in the past so a peer whose clock is behind still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)


class PkiError(ValueError):
    """A certificate, key or PKI folder that is not what the federation expects."""


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


@dataclass(frozen=True)
class CertInfo:
    common_name: str
    issuer: str
    fingerprint: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    usages: tuple[str, ...]  # extended key usages: "serverAuth", "clientAuth"
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]


# ---------------------------------------------------------------- pure core: names and certificates


def check_common_name(name: str) -> str:
    """The name itself if it is a valid site/server common name, else a PkiError naming it."""
    if not isinstance(name, str) or not COMMON_NAME.fullmatch(name):
        raise PkiError(
            f"invalid common name {name!r}: expected lower-case letters, digits, '.' and '-', "
            f"starting with a letter or digit, at most 63 characters (like 'site-a')"
        )
    if name == "ca":
        raise PkiError("invalid common name 'ca': reserved for the CA's own files ca.pem/ca.key")
    return name


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[IpAddress]]:
    """Sort extra server hosts into DNS names and IP addresses; a bad one is named in the error."""
    dns: list[str] = []
    ips: list[IpAddress] = []
    for raw in hosts:
        host = raw.strip().lower() if isinstance(raw, str) else raw
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not isinstance(host, str) or not _HOSTNAME.fullmatch(host):
                raise PkiError(
                    f"invalid host {raw!r}: expected a DNS name (like 'agg.example.org') "
                    f"or an IP address (like '10.0.0.5')"
                ) from None
            if host not in dns:
                dns.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return dns, ips


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_ca(
    key: ec.EllipticCurvePrivateKey, name: str, days: int, now: dt.datetime
) -> x509.Certificate:
    """A self-signed CA certificate (CA:TRUE, path length 0: it signs leaves only)."""
    if days <= 0:
        raise PkiError(f"CA validity must be a positive number of days, found {days}")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public: ec.EllipticCurvePublicKey,
    common_name: str,
    role: Role,
    hosts: Sequence[str],
    days: int,
    now: dt.datetime,
) -> x509.Certificate:
    """A leaf certificate signed by the CA: serverAuth for the aggregator, clientAuth for sites.

    The server's SANs are localhost, 127.0.0.1, ::1, its common name and `hosts`; a site's SAN is
    its common name. Validity is capped at the CA's own expiry.
    """
    check_common_name(common_name)
    if role not in ROLES:
        raise PkiError(f"invalid role {role!r}: expected one of {list(ROLES)}")
    if days <= 0:
        raise PkiError(f"certificate validity must be a positive number of days, found {days}")
    if role == "site" and hosts:
        raise PkiError(f"extra hosts are for the server certificate only, found {list(hosts)}")
    if role == "server":
        dns, ips = split_hosts([*SERVER_DEFAULT_HOSTS, common_name, *hosts])
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ip) for ip in ips]
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        sans = [x509.DNSName(common_name)]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _load_cert(cert_pem: bytes, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        # Never echo a private key that was passed by mistake, not even its first bytes.
        found = "a private key" if b"PRIVATE KEY" in cert_pem else f"{cert_pem[:40]!r}..."
        raise PkiError(
            f"{what}: expected a PEM certificate ('-----BEGIN CERTIFICATE-----'), found {found}"
        ) from None


def _name_of(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else name.rfc4514_string()


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, as 64 lower-case hex digits."""
    return _load_cert(cert_pem).fingerprint(hashes.SHA256()).hex()


def common_name(cert_pem: bytes) -> str:
    """The subject common name: the site's identity as the aggregator sees it."""
    cert = _load_cert(cert_pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise PkiError(
            f"expected exactly one common name in the certificate subject, found {len(cns)} "
            f"({cert.subject.rfc4514_string()!r})"
        )
    return str(cns[0].value)


def describe(cert_pem: bytes) -> CertInfo:
    """What `fedcxr pki show` prints about a certificate."""
    cert = _load_cert(cert_pem)
    ext = cert.extensions
    try:
        is_ca = ext.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = tuple(_USAGE_NAMES.get(u, u.dotted_string) for u in eku)
    except x509.ExtensionNotFound:
        usages = ()
    try:
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns_names, ips = (), ()
    return CertInfo(
        common_name=_name_of(cert.subject),
        issuer=_name_of(cert.issuer),
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=is_ca,
        usages=usages,
        dns_names=dns_names,
        ip_addresses=ips,
    )


def _check_validity(cert: x509.Certificate, what: str, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise PkiError(
            f"{what} is not valid yet: valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC, "
            f"now is {now:%Y-%m-%d %H:%M} UTC (clock skew?)"
        )
    if now > cert.not_valid_after_utc:
        raise PkiError(
            f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
            f"(now {now:%Y-%m-%d %H:%M} UTC); issue a new one"
        )


def verify_chain(cert_pem: bytes, ca_pem: bytes, *, now: dt.datetime | None = None) -> None:
    """Raise PkiError unless `cert_pem` was signed by the CA in `ca_pem` and both are in date."""
    now = now or dt.datetime.now(dt.UTC)
    cert = _load_cert(cert_pem)
    ca = _load_cert(ca_pem, "CA certificate")
    who = f"certificate {_name_of(cert.subject)!r}"
    ca_name = _name_of(ca.subject)
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PkiError(f"{ca_name!r} is not a CA certificate (expected BasicConstraints CA:TRUE)")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        issuer = _name_of(cert.issuer)
        why = (
            "a different CA of the same name"
            if cert.issuer == ca.subject
            else f"its issuer is {issuer!r}"
        )
        raise PkiError(
            f"{who} was not signed by CA {ca_name!r} with fingerprint "
            f"{ca.fingerprint(hashes.SHA256()).hex()[:16]}... ({why})"
        ) from None
    _check_validity(ca, f"CA {ca_name!r}", now)
    _check_validity(cert, who, now)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(key_pem: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        # Never echo the key's bytes, only what kind of problem it has.
        raise PkiError(f"{path}: expected an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: expected an EC private key, found {type(key).__name__}")
    return key


def _matches(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return cert.public_key() == key.public_key()


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
    cert = _load_cert(cert_pem, str(cert_path))
    key = _load_key(key_pem, key_path)
    if not _matches(cert, key):
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
    _write_atomic(files.key, _key_pem(key), 0o600)
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
    _write_atomic(files.key, _key_pem(key), 0o600)
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
    cert = _load_cert(cert_pem, str(cert_path))
    if not _matches(cert, _load_key(key_pem, key_path)):
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
        cert = _load_cert(cert_pem, str(files.cert))
        if not _matches(cert, _load_key(files.key.read_bytes(), files.key)):
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
