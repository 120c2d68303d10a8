"""SeaweedFS locked down: JWT signing keys and mutual-TLS certificates in the state folder.

Measured on the installed weed (4.48): without ``security.toml`` any local process can GET,
POST or PUT bucket objects on the filer port, and anything it writes there S3 then serves.
So ``weed mini`` starts with ``-config_dir=<state>/security`` holding (all mode 0600):

``security.toml``   the four JWT signing keys (volume write/read, filer write/read): an
                    unsigned request to the filer or volume HTTP port gets 401
``ca.crt``          a private CA, and ``stack.crt``/``stack.key`` signed by it: every gRPC
                    port (master, volume, filer, s3, admin) demands this client certificate,
                    so an anonymous gRPC client fails the TLS handshake; the master's
                    and the volume server's HTTP ports serve HTTPS only to a client with
                    that certificate (their status pages answer anyone otherwise, and
                    weed cannot switch them off); the filer reads volumes as that client

and ``-disableHttp``: the master's HTTP API (``/dir/assign`` hands a write token to anyone,
``/col/delete`` drops a whole bucket's volumes, unauthenticated whatever the keys) and the
filer's HTTP API are not served at all. The S3 gateway, inside the same process, signs its
own requests and talks gRPC with the certificate, so S3 with the stack's keys works as before.
Created once per state folder and kept: a restarted stack finds its own keys.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import ssl
from pathlib import Path

from malaria.io.atomic import write_atomic
from malaria_dev.stack.config import StackConfig

PRIVATE = 0o600
SECURITY_TOML = "security.toml"
CA_CERT = "ca.crt"
CERT = "stack.crt"
KEY = "stack.key"
# weed's gRPC sections that take a server (and client) certificate.
_GRPC_SECTIONS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker",
                  "msg_agent", "mq", "client")
# weed's HTTP servers that serve HTTPS and demand the stack's client certificate.
_HTTPS_SERVERS = ("master", "volume")


def security_dir(cfg: StackConfig) -> Path:
    return cfg.state_dir / "security"


def internal_tls(cfg: StackConfig) -> ssl.SSLContext:
    """TLS for talking to the master's and volume server's HTTPS ports as the stack does:
    trusting only the stack's CA and presenting the stack's client certificate."""
    folder = security_dir(cfg)
    context = ssl.create_default_context(cafile=str(folder / CA_CERT))
    context.load_cert_chain(str(folder / CERT), str(folder / KEY))
    return context


def _certificates(folder: Path) -> None:
    """A CA and one certificate for every component (weed does not check host names), both
    for server and client use, valid ten years: a dev stack should not expire under a lab."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "malaria-stack-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "malaria-stack")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    write_atomic(folder / CA_CERT, ca.public_bytes(pem), mode=PRIVATE)
    write_atomic(folder / CERT, cert.public_bytes(pem), mode=PRIVATE)
    write_atomic(folder / KEY, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), mode=PRIVATE)
    # The CA's private key is not kept: nothing else is ever signed with it.


def _security_toml(folder: Path) -> str:
    keys = {name: secrets.token_hex(32) for name in
            ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")}
    lines = ["# written by `malaria stack up`; contains secrets (see malaria_dev/stack/security.py)"]
    for section, key in keys.items():
        lines += [f"[{section}]", f'key = "{key}"', "expires_after_seconds = 10", ""]
    lines += ["[access]", "ui = false", "",
              "[filer.expose_directory_metadata]", "enabled = false", "",
              "[grpc]", f'ca = "{folder / CA_CERT}"', ""]
    for section in _GRPC_SECTIONS:
        lines += [f"[grpc.{section}]", f'cert = "{folder / CERT}"', f'key = "{folder / KEY}"', ""]
    # HTTPS with a required client certificate on the master's and the volume server's
    # HTTP ports: their status pages (master ``/``, volume ``/status``) answer anything
    # that connects, and weed has no switch to turn them off. The filer, which reads the
    # volumes over HTTP, presents the stack certificate as an HTTPS client.
    for section in _HTTPS_SERVERS:
        lines += [f"[https.{section}]", f'cert = "{folder / CERT}"', f'key = "{folder / KEY}"',
                  f'ca = "{folder / CA_CERT}"', ""]
    lines += ["[https.client]", "enabled = true", f'cert = "{folder / CERT}"',
              f'key = "{folder / KEY}"', f'ca = "{folder / CA_CERT}"', ""]
    return "\n".join(lines)


def ensure_seaweedfs_security(cfg: StackConfig) -> Path:
    """Create the folder weed reads ``security.toml`` from (once; kept afterwards) and
    return it. A folder moved elsewhere gets new files: the toml names certificate paths."""
    folder = security_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    toml = folder / SECURITY_TOML
    complete = all((folder / n).is_file() for n in (SECURITY_TOML, CA_CERT, CERT, KEY))
    # A folder written before a section was added (or moved: the toml names certificate
    # paths) gets new files; the keys and certificates are internal to the stack.
    if not complete or any(marker not in toml.read_text()
                           for marker in (str(folder / CA_CERT), "[https.client]")):
        _certificates(folder)
        write_atomic(toml, _security_toml(folder), mode=PRIVATE)
    for name in (SECURITY_TOML, CA_CERT, CERT, KEY):
        os.chmod(folder / name, PRIVATE)
    return folder
