"""Pure x509 for the federation PKI: names, keys, CA and leaf certificates, inspection, chains."""

from __future__ import annotations

import datetime as dt
import ipaddress
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
    """A fresh P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    not_after: dt.datetime,
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    """What CA and leaf certificates share: names, key, serial, dates, constraints, key usage."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def build_ca(
    key: ec.EllipticCurvePrivateKey, name: str, days: int, now: dt.datetime
) -> x509.Certificate:
    """A self-signed CA certificate (CA:TRUE, path length 0: it signs leaves only)."""
    if days <= 0:
        raise PkiError(f"CA validity must be a positive number of days, found {days}")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    public = key.public_key()
    not_after = now + dt.timedelta(days=days)
    return (
        _builder(subject, subject, public, now, not_after, ca=True)
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
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        _builder(subject, ca_cert.subject, public, now, not_after, ca=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def load_cert(cert_pem: bytes, what: str = "certificate") -> x509.Certificate:
    """Parse a PEM certificate; a PkiError naming `what` (never echoing a key) if it is not one."""
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
    return load_cert(cert_pem).fingerprint(hashes.SHA256()).hex()


def common_name(cert_pem: bytes) -> str:
    """The subject common name: the site's identity as the aggregator sees it."""
    cert = load_cert(cert_pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise PkiError(
            f"expected exactly one common name in the certificate subject, found {len(cns)} "
            f"({cert.subject.rfc4514_string()!r})"
        )
    return str(cns[0].value)


def describe(cert_pem: bytes) -> CertInfo:
    """What `fedcxr pki show` prints about a certificate."""
    cert = load_cert(cert_pem)
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
    cert = load_cert(cert_pem)
    ca = load_cert(ca_pem, "CA certificate")
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


def encode_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(key_pem: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM EC private key read from `path`; a PkiError naming it if not."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        # Never echo the key's bytes, only what kind of problem it has.
        raise PkiError(f"{path}: expected an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: expected an EC private key, found {type(key).__name__}")
    return key


def key_matches(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    """True if `key` is the private key of `cert`."""
    return cert.public_key() == key.public_key()
