"""Federation PKI: real certificates on disk, chain checks, and a real mutual-TLS grpc call."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from fedcxr.cli import app
from fedcxr.federation.certs import common_name, describe, fingerprint, verify_chain
from fedcxr.federation.pki import (
    PkiError,
    ensure_federation,
    init_ca,
    issue,
    load_bundle,
)

SITES = ("site-a", "site-b")
METHOD = "/fedcxr.test.Echo/WhoAmI"


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Path:
    """A federation folder: CA, aggregator (server) and two sites."""
    folder = tmp_path_factory.mktemp("pki")
    ensure_federation(folder, SITES, hosts=("agg.example.org", "10.1.2.3"))
    return folder


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """A second CA of the same name, with its own 'site-a': an impostor federation."""
    folder = tmp_path_factory.mktemp("other-pki")
    init_ca(folder)
    issue(folder, "site-a", "site")
    return folder


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificates_chain_to_their_ca_only(fed, other):
    ca = (fed / "ca.pem").read_bytes()
    for name in ("aggregator", *SITES):
        verify_chain((fed / f"{name}.pem").read_bytes(), ca)
    with pytest.raises(PkiError, match="was not signed by CA 'fedcxr federation CA'"):
        verify_chain((other / "site-a.pem").read_bytes(), ca)
    with pytest.raises(PkiError, match="expired"):
        verify_chain(
            (fed / "site-a.pem").read_bytes(), ca, now=dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
        )
    with pytest.raises(PkiError, match="not a CA certificate"):
        verify_chain((fed / "site-a.pem").read_bytes(), (fed / "site-b.pem").read_bytes())


def test_keys_are_private_and_certs_are_readable(fed):
    for name in ("ca", "aggregator", *SITES):
        assert stat.S_IMODE((fed / f"{name}.key").stat().st_mode) == 0o600, name
        assert stat.S_IMODE((fed / f"{name}.pem").stat().st_mode) == 0o644, name
    assert not list(fed.glob(".*.tmp")), "temporary files left behind"


def test_extensions_match_the_roles(fed):
    ca = _cert(fed / "ca.pem")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    for name, usage in [
        ("aggregator", ExtendedKeyUsageOID.SERVER_AUTH),
        ("site-a", ExtendedKeyUsageOID.CLIENT_AUTH),
    ]:
        cert = _cert(fed / f"{name}.pem")
        ext = cert.extensions
        assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
        assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        ext.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_server_and_site_names(fed):
    san = _cert(fed / "aggregator.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    dns = san.value.get_values_for_type(x509.DNSName)
    ips = san.value.get_values_for_type(x509.IPAddress)
    assert {"localhost", "agg.example.org"} <= set(dns)
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")} <= set(ips)
    info = describe((fed / "site-b.pem").read_bytes())
    assert info.dns_names == ("site-b",) and info.ip_addresses == ()
    assert info.usages == ("clientAuth",) and info.issuer == "fedcxr federation CA"


def test_common_name_and_fingerprint_round_trip(fed):
    pem = (fed / "site-a.pem").read_bytes()
    assert common_name(pem) == "site-a"
    der = _cert(fed / "site-a.pem").public_bytes(serialization.Encoding.DER)
    assert fingerprint(pem) == hashlib.sha256(der).hexdigest()
    assert len(fingerprint(pem)) == 64
    assert fingerprint(pem) != fingerprint((fed / "site-b.pem").read_bytes())
    with pytest.raises(PkiError, match="expected a PEM certificate"):
        fingerprint(b"not a certificate")


@pytest.mark.parametrize("bad", ["Site-A", "site_a", "-site", "", "a" * 64, "ca", "site a"])
def test_bad_common_names_are_named(fed, tmp_path, bad):
    with pytest.raises(PkiError, match="invalid common name"):
        issue(fed, bad, "site", out=tmp_path)
    assert not list(tmp_path.iterdir())


def test_bad_hosts_and_roles_are_rejected(fed, tmp_path):
    with pytest.raises(PkiError, match="invalid host 'bad host!'"):
        issue(fed, "agg2", "server", hosts=["bad host!"], out=tmp_path)
    with pytest.raises(PkiError, match="server certificate only"):
        issue(fed, "site-z", "site", hosts=["example.org"], out=tmp_path)
    with pytest.raises(PkiError, match="invalid role"):
        issue(fed, "site-z", "client", out=tmp_path)  # type: ignore[arg-type]


def test_init_and_issue_refuse_to_overwrite(tmp_path):
    files = init_ca(tmp_path)
    before = files.cert.read_bytes()
    with pytest.raises(PkiError, match=r"ca\.pem already exists"):
        init_ca(tmp_path)
    assert files.cert.read_bytes() == before
    issue(tmp_path, "site-a", "site")
    with pytest.raises(PkiError, match=r"site-a\.pem already exists"):
        issue(tmp_path, "site-a", "site")
    init_ca(tmp_path, force=True)
    assert files.cert.read_bytes() != before
    # the old site cert no longer chains to the replaced CA
    with pytest.raises(PkiError, match="was not signed"):
        load_bundle(tmp_path, "site-a")


def test_issue_without_a_ca_names_the_missing_file(tmp_path):
    with pytest.raises(PkiError, match=r"CA certificate not found: expected .*ca\.pem"):
        issue(tmp_path, "site-a", "site")


def test_ensure_federation_is_idempotent(tmp_path):
    first = ensure_federation(tmp_path, ["site-a", "site-b", "site-c"])
    assert list(first) == ["aggregator", "site-a", "site-b", "site-c"]
    assert first["aggregator"].role == "server" and first["site-c"].role == "site"
    prints = {n: fingerprint(f.cert.read_bytes()) for n, f in first.items()}
    ca_print = fingerprint((tmp_path / "ca.pem").read_bytes())
    again = ensure_federation(tmp_path, ["site-a", "site-b", "site-c"])
    assert again == first
    assert {n: fingerprint(f.cert.read_bytes()) for n, f in again.items()} == prints
    assert fingerprint((tmp_path / "ca.pem").read_bytes()) == ca_print
    # a missing site cert is issued; a new server host re-issues only the server cert
    (tmp_path / "site-b.pem").unlink()
    third = ensure_federation(tmp_path, ["site-a", "site-b", "site-c"], hosts=["agg.local"])
    now = {n: fingerprint(f.cert.read_bytes()) for n, f in third.items()}
    assert now["site-a"] == prints["site-a"] and now["site-c"] == prints["site-c"]
    assert now["site-b"] != prints["site-b"] and now["aggregator"] != prints["aggregator"]
    with pytest.raises(PkiError, match="appears twice"):
        ensure_federation(tmp_path, ["site-a", "site-a"])


def test_ensure_federation_refuses_half_a_ca(tmp_path):
    init_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(PkiError, match=r"CA private key not found: expected .*ca\.key"):
        ensure_federation(tmp_path, ["site-a"])


def test_load_bundle_checks_key_and_chain(fed, tmp_path):
    bundle = load_bundle(fed, "site-a")
    assert bundle.root_certificates == (fed / "ca.pem").read_bytes()
    assert bundle.private_key.startswith(b"-----BEGIN PRIVATE KEY-----")
    for name in ("ca.pem", "site-a.pem"):
        (tmp_path / name).write_bytes((fed / name).read_bytes())
    (tmp_path / "site-a.key").write_bytes((fed / "site-b.key").read_bytes())
    with pytest.raises(PkiError, match=r"site-a\.key is not the private key of"):
        load_bundle(tmp_path, "site-a")


# ---------------------------------------------------------------- real mutual TLS with grpc


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    return context.auth_context()["x509_common_name"][0]


@pytest.fixture(scope="module")
def server(fed):
    bundle = load_bundle(fed, "aggregator")
    creds = grpc.ssl_server_credentials(
        [(bundle.private_key, bundle.certificate_chain)],
        root_certificates=bundle.root_certificates,
        require_client_auth=True,
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "fedcxr.test.Echo", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i)}
            ),
        )
    )
    port = srv.add_secure_port("127.0.0.1:0", creds)
    assert port
    srv.start()
    try:
        yield port
    finally:
        srv.stop(None)


def _call(port: int, creds: grpc.ChannelCredentials, host: str = "127.0.0.1") -> bytes:
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.secure_channel(f"{host}:{port}", creds, options=options) as channel:
        return channel.unary_unary(METHOD)(b"", timeout=5)


def test_mtls_site_is_identified_by_its_common_name(fed, server):
    for site in SITES:
        b = load_bundle(fed, site)
        creds = grpc.ssl_channel_credentials(
            b.root_certificates, b.private_key, b.certificate_chain
        )
        assert _call(server, creds) == site.encode()
    b = load_bundle(fed, "site-a")
    creds = grpc.ssl_channel_credentials(b.root_certificates, b.private_key, b.certificate_chain)
    assert _call(server, creds, host="localhost") == b"site-a"


def test_mtls_refuses_a_cert_from_another_ca(fed, other, server):
    impostor = load_bundle(other, "site-a")
    creds = grpc.ssl_channel_credentials(
        (fed / "ca.pem").read_bytes(), impostor.private_key, impostor.certificate_chain
    )
    with pytest.raises(grpc.RpcError) as err:
        _call(server, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_cert(fed, server):
    creds = grpc.ssl_channel_credentials((fed / "ca.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        _call(server, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_site_refuses_a_server_of_another_ca(other, server):
    b = load_bundle(other, "site-a")
    creds = grpc.ssl_channel_credentials(b.root_certificates, b.private_key, b.certificate_chain)
    with pytest.raises(grpc.RpcError) as err:
        _call(server, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- CLI


def test_cli_init_issue_show(tmp_path):
    runner = CliRunner()
    folder = tmp_path / "pki"
    result = runner.invoke(app, ["pki", "init", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "ca.pem").is_file()
    result = runner.invoke(app, ["pki", "init", str(folder)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output
    result = runner.invoke(app, ["pki", "init", str(folder), "--force"])
    assert result.exit_code == 0, result.output

    result = runner.invoke(app, ["pki", "issue", "site-a", "--dir", str(folder)])
    assert result.exit_code == 0, result.output
    args = ["pki", "issue", "aggregator", "--dir", str(folder), "--role", "server"]
    result = runner.invoke(app, [*args, "--host", "agg.example.org", "--host", "10.0.0.7"])
    assert result.exit_code == 0, result.output
    assert "agg.example.org" in result.output and "10.0.0.7" in result.output
    result = runner.invoke(app, ["pki", "issue", "Site_B", "--dir", str(folder)])
    assert result.exit_code == 1 and "invalid common name 'Site_B'" in result.output

    result = runner.invoke(app, ["pki", "show", str(folder / "site-a.pem")])
    assert result.exit_code == 0, result.output
    fp = fingerprint((folder / "site-a.pem").read_bytes())
    for text in ("common name: site-a", fp, "issuer:      fedcxr federation CA", "clientAuth"):
        assert text in result.output
    assert "chain:       ok" in result.output
    assert "PRIVATE KEY" not in result.output
    key_text = (folder / "site-a.key").read_text()
    result = runner.invoke(app, ["pki", "show", str(folder / "site-a.key")])
    assert result.exit_code == 1 and "found a private key" in result.output
    assert key_text.splitlines()[1][:12] not in result.output

    init_ca(tmp_path / "other")
    result = runner.invoke(
        app, ["pki", "show", str(folder / "site-a.pem"), "--ca", str(tmp_path / "other/ca.pem")]
    )
    assert result.exit_code == 1 and "BROKEN" in result.output
