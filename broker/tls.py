"""TLS material for the broker: a private CA, a server certificate, client certificates.

`hotswap broker init-tls --dir D` writes under D:

    ca.crt  ca.key                     the CA (key 0600); reused once it exists
    server.crt  server.key             mosquitto's TLS listener (SANs = hosts)
    clients/<name>.crt  <name>.key     CN = name, clientAuth: on a listener with
                                       `use_identity_as_username true` the CN is
                                       the client's MQTT username

Keys are ECDSA P-256, which mosquitto 2.0.11 on OpenSSL 3, Python's `ssl` and
the small TLS stacks of devices all accept. Certificates carry the extensions
OpenSSL's strict mode checks (Python 3.13 turns it on by default).

Re-running is safe: the CA is never replaced (to start a new one, remove
ca.crt and ca.key), and a certificate already there that still fits is kept.
One that no longer fits (other hosts, another CA, expired, key missing) is
replaced only with `force`; `init_tls(force=True)` then also replaces every
client certificate of the directory that no longer fits (an older CA's).
`add_client_cert(force=True)` issues a new key and certificate even if the
old ones fit: that is how a client's key is rotated.

The `build_*` functions and the checks are pure (certificates from keys, names
and a clock); `init_tls`, `add_client_cert` and `load_tls_files` do the file
I/O, writing every file atomically, keys with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import HotswapError
from shared.keys import write_atomic
from shared.topics import TopicError, check_ident

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
CLIENTS_DIR = "clients"

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 825  # the longest leaf lifetime Apple's TLS stack accepts
CA_DAYS = 3650
CA_NAME = "hotswap CA"
# Certificates start a little in the past so that a device whose clock lags accepts them.
BACKDATE = dt.timedelta(minutes=5)

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")

# Issues the certificate for a freshly generated public key.
_Build = Callable[[ec.EllipticCurvePublicKey], x509.Certificate]


class TlsError(HotswapError):
    """TLS material is missing, inconsistent, or would be overwritten."""

    reason = "tls_invalid"

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, slots=True)
class ClientFiles:
    """A client's certificate and key; the certificate's CN is `name`."""

    name: str
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the TLS material of one directory is."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: tuple[ClientFiles, ...] = ()

    @classmethod
    def at(cls, directory: Path, clients: Sequence[str] = ()) -> TlsFiles:
        """The paths under `directory` (pure: nothing is read or checked)."""
        return cls(
            directory=directory,
            ca_cert=directory / CA_CERT,
            ca_key=directory / CA_KEY,
            server_cert=directory / SERVER_CERT,
            server_key=directory / SERVER_KEY,
            clients=tuple(client_files(directory, name) for name in clients),
        )

    def client(self, name: str) -> ClientFiles:
        for files in self.clients:
            if files.name == name:
                return files
        raise TlsError(f"no client certificate {name!r} in {self.directory}")


def client_files(directory: Path, name: str) -> ClientFiles:
    """The paths of client `name`'s certificate and key (pure)."""
    check_client_name(name)
    base = directory / CLIENTS_DIR
    return ClientFiles(name, base / f"{name}.crt", base / f"{name}.key")


def check_client_name(name: str) -> str:
    """A client name is a CN, an MQTT username and a file name: a topic-safe identifier."""
    try:
        return check_ident(name, "client name")
    except TopicError as exc:
        raise TlsError(str(exc)) from None


# --- pure: certificates from keys, names and a clock -------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """IP addresses as IPAddress entries (what clients match an IP against), others as DNS."""
    if not hosts:
        raise TlsError("the server certificate needs at least one host name or address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
            continue
        except ValueError:
            pass
        if not _HOSTNAME.match(host) or len(host) > 253:
            raise TlsError(f"invalid host {host!r} for the server certificate")
        names.append(x509.DNSName(host.rstrip(".").lower()))
    return x509.SubjectAlternativeName(names)


def build_ca_cert(
    key: ec.EllipticCurvePrivateKey, *, now: dt.datetime, days: int = CA_DAYS
) -> x509.Certificate:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    public = key.public_key()
    return (
        _builder(name, name, public, now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public: ec.EllipticCurvePublicKey,
    *,
    hosts: Sequence[str],
    now: dt.datetime,
    days: int = DEFAULT_DAYS,
) -> x509.Certificate:
    """The broker's certificate: serverAuth, valid for `hosts` (DNS names and IPs)."""
    sans = subject_alt_names(hosts)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0].strip("[]"))])
    builder = _leaf_builder(
        ca_key, ca_cert, public, subject, ExtendedKeyUsageOID.SERVER_AUTH, now, days
    )
    return builder.add_extension(sans, critical=False).sign(ca_key, hashes.SHA256())


def build_client_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public: ec.EllipticCurvePublicKey,
    *,
    name: str,
    now: dt.datetime,
    days: int = DEFAULT_DAYS,
) -> x509.Certificate:
    """A client certificate whose CN is `name`: the broker's username for it."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, check_client_name(name))])
    builder = _leaf_builder(
        ca_key, ca_cert, public, subject, ExtendedKeyUsageOID.CLIENT_AUTH, now, days
    )
    return builder.sign(ca_key, hashes.SHA256())


def server_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for, as strings."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return _san_strings(sans)


def _san_strings(sans: x509.SubjectAlternativeName) -> list[str]:
    return [str(v) for v in sans.get_values_for_type(x509.DNSName)] + [
        str(v) for v in sans.get_values_for_type(x509.IPAddress)
    ]


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def leaf_problem(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    now: dt.datetime,
    common_name_is: str | None = None,
    hosts: Sequence[str] | None = None,
) -> str | None:
    """Why an existing certificate cannot be kept, or None if it can."""
    if not _same_public_key(cert.public_key(), key.public_key()):
        return "does not match its key"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return f"was not issued by this CA ({CA_CERT})"
    if cert.not_valid_after_utc <= now:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if common_name_is is not None and common_name(cert) != common_name_is:
        return f"has CN {common_name(cert)!r}, not {common_name_is!r}"
    if hosts is not None:
        have = server_hosts(cert)
        if sorted(_san_strings(subject_alt_names(hosts))) != sorted(have):
            return f"is for {', '.join(have) or 'no hosts'}, not {', '.join(hosts)}"
    return None


def _same_public_key(a: object, b: ec.EllipticCurvePublicKey) -> bool:
    if not isinstance(a, ec.EllipticCurvePublicKey):
        return False
    der = Encoding.DER
    spki = PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(der, spki) == b.public_bytes(der, spki)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    days: int,
    not_after_limit: dt.datetime | None = None,
) -> x509.CertificateBuilder:
    if days < 1:
        raise TlsError(f"certificate lifetime must be at least 1 day, not {days}")
    not_after = now + dt.timedelta(days=days)
    if not_after_limit is not None:
        not_after = min(not_after, not_after_limit)  # a leaf never outlives its CA
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
    )


def _leaf_builder(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public: ec.EllipticCurvePublicKey,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    now: dt.datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        _builder(subject, ca_cert.subject, public, now, days, ca_cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )


# --- file I/O ------------------------------------------------------------------------------


def init_tls(
    directory: Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    clients: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> TlsFiles:
    """Create (or complete) the CA, the server certificate and `clients`' certificates.

    Keeps what fits; `force` replaces what no longer does instead of refusing.
    Returns the paths, with every client certificate the directory holds.
    """
    names = list(dict.fromkeys(check_client_name(n) for n in clients))
    subject_alt_names(hosts)  # refuse bad input before anything is written
    if days < 1:
        raise TlsError(f"certificate lifetime must be at least 1 day, not {days}")
    files = TlsFiles.at(directory)
    now = _now()
    ca_key, ca_cert = _load_or_create_ca(files, now)
    if force:
        names += [name for name in _client_names(directory, with_key=False) if name not in names]
    _ensure_leaf(
        files.server_cert,
        files.server_key,
        ca_key,
        ca_cert,
        now=now,
        replace_misfit=force,
        hosts=hosts,
        build=lambda public: build_server_cert(
            ca_key, ca_cert, public, hosts=hosts, now=now, days=days
        ),
    )
    for name in names:
        _ensure_client(directory, name, ca_key, ca_cert, now=now, days=days, replace_misfit=force)
    return load_tls_files(directory)


def add_client_cert(
    directory: Path, name: str, *, days: int = DEFAULT_DAYS, force: bool = False
) -> ClientFiles:
    """Issue `clients/<name>.crt` with the directory's CA; an existing one that fits is kept.

    `force` issues a new key and certificate whatever is there.
    """
    check_client_name(name)
    files = TlsFiles.at(directory)
    if not files.ca_cert.exists():
        raise TlsError(f"no CA in {directory}: run `hotswap broker init-tls` first", path=directory)
    now = _now()
    ca_key, ca_cert = _load_ca(files, now)
    return _ensure_client(
        directory, name, ca_key, ca_cert, now=now, days=days, replace_misfit=force, reissue=force
    )


def load_tls_files(directory: Path) -> TlsFiles:
    """The TLS material of `directory`; TlsError naming the first file that is missing."""
    files = TlsFiles.at(directory, _client_names(directory))
    for path in (files.ca_cert, files.server_cert, files.server_key):
        if not path.is_file():
            raise TlsError(f"{path} is missing (run `hotswap broker init-tls`)", path=path)
    return files


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _client_names(directory: Path, *, with_key: bool = True) -> list[str]:
    base = directory / CLIENTS_DIR
    if not base.is_dir():
        return []
    return sorted(
        p.stem
        for p in base.glob("*.crt")
        if _is_ident(p.stem) and (p.with_suffix(".key").is_file() or not with_key)
    )


def _is_ident(name: str) -> bool:
    try:
        check_ident(name)
    except TopicError:
        return False
    return True


def _load_or_create_ca(
    files: TlsFiles, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if files.ca_cert.exists() or files.ca_key.exists():
        return _load_ca(files, now)
    key = new_key()
    cert = build_ca_cert(key, now=now)
    # Key first: a crash in between leaves no certificate without its key.
    _write_key(files.ca_key, key)
    write_atomic(files.ca_cert, cert.public_bytes(Encoding.PEM))
    return key, cert


def _load_ca(
    files: TlsFiles, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    for path in (files.ca_cert, files.ca_key):
        if not path.is_file():
            raise TlsError(
                f"{path} is missing: restore it, or remove {CA_CERT} and {CA_KEY} "
                "to start a new CA",
                path=path,
            )
    cert = _read_cert(files.ca_cert)
    key = _read_key(files.ca_key)
    if not _same_public_key(cert.public_key(), key.public_key()):
        raise TlsError(f"{files.ca_key} is not the key of {files.ca_cert}", path=files.ca_key)
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise TlsError(f"{files.ca_cert} is not a CA certificate", path=files.ca_cert)
    if cert.not_valid_after_utc <= now:
        raise TlsError(
            f"{files.ca_cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}: "
            f"remove {CA_CERT} and {CA_KEY} to start a new CA",
            path=files.ca_cert,
        )
    return key, cert


def _ensure_client(
    directory: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    now: dt.datetime,
    days: int,
    replace_misfit: bool,
    reissue: bool = False,
) -> ClientFiles:
    files = client_files(directory, name)
    _ensure_leaf(
        files.cert,
        files.key,
        ca_key,
        ca_cert,
        now=now,
        replace_misfit=replace_misfit,
        reissue=reissue,
        common_name_is=name,
        build=lambda public: build_client_cert(
            ca_key, ca_cert, public, name=name, now=now, days=days
        ),
    )
    return files


def _ensure_leaf(
    cert_path: Path,
    key_path: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    now: dt.datetime,
    replace_misfit: bool,
    build: _Build,
    reissue: bool = False,
    common_name_is: str | None = None,
    hosts: Sequence[str] | None = None,
) -> None:
    """Keep a certificate that fits, refuse to replace a misfit unless told to, else issue."""
    if cert_path.exists() and not reissue:
        problem = _leaf_file_problem(
            cert_path, key_path, ca_cert, now=now, common_name_is=common_name_is, hosts=hosts
        )
        if problem is None:
            return
        if not replace_misfit:
            raise TlsError(f"{cert_path} {problem}; pass force to replace it", path=cert_path)
    key = new_key()
    cert = build(key.public_key())
    _write_key(key_path, key)
    write_atomic(cert_path, cert.public_bytes(Encoding.PEM))


def _leaf_file_problem(
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    *,
    now: dt.datetime,
    common_name_is: str | None,
    hosts: Sequence[str] | None,
) -> str | None:
    if not key_path.is_file():
        return f"has no key ({key_path.name} is missing)"
    try:
        cert, key = _read_cert(cert_path), _read_key(key_path)
    except TlsError as exc:
        return f"cannot be used ({exc})"
    return leaf_problem(cert, key, ca_cert, now=now, common_name_is=common_name_is, hosts=hosts)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    write_atomic(path, pem, mode=0o600)


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise TlsError(f"cannot read {path}: {exc.strerror}", path=path) from exc
    except ValueError:
        raise TlsError(f"{path} is not a PEM certificate", path=path) from None


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise TlsError(f"cannot read {path}: {exc.strerror}", path=path) from exc
    except (ValueError, TypeError):
        raise TlsError(f"{path} is not an unencrypted PEM private key", path=path) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{path} is not an ECDSA key", path=path)
    return key
