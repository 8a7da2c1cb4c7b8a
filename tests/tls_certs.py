"""Throwaway certificates for TLS tests: a CA, a server certificate for 127.0.0.1/localhost, a client certificate.

Made with the `openssl` command line (the test environment has no `cryptography` package); valid for one
day, keys unencrypted, all in the directory given.
"""

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# P-256 keys: quick to generate, and accepted by every OpenSSL that Redis and Python link against.
KEY_OPTIONS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
VALID_DAYS = "1"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA that signed both certificates, the server's pair and a client's pair."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


class CertificateError(RuntimeError):
    """openssl is missing or failed; the message carries its output."""


def make_tls_files(directory: Path) -> TlsFiles:
    if shutil.which("openssl") is None:
        raise CertificateError("no openssl on PATH to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    _openssl(
        "req", "-x509", *KEY_OPTIONS, "-keyout", ca_key, "-out", ca, "-days", VALID_DAYS,
        "-subj", "/CN=kronos-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    # The server certificate names both forms a test may connect to; clients verify the name they dialled.
    server_cert, server_key = _signed(
        directory, "server", ca, ca_key, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
    )
    client_cert, client_key = _signed(directory, "client", ca, ca_key, "extendedKeyUsage=clientAuth")
    return TlsFiles(ca, server_cert, server_key, client_cert, client_key)


def _signed(directory: Path, name: str, ca: Path, ca_key: Path, extensions: str) -> tuple[Path, Path]:
    cert, key, request = directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.csr"
    extensions_file = directory / f"{name}.ext"
    # Python 3.13+ verifies strictly (VERIFY_X509_STRICT): leaf certificates need the key identifiers.
    extensions_file.write_text(
        f"{extensions}\nbasicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl("req", "-new", *KEY_OPTIONS, "-keyout", key, "-out", request, "-subj", f"/CN=kronos-test-{name}")
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", VALID_DAYS, "-extfile", extensions_file,
    )  # fmt: skip
    return cert, key


def _openssl(*arguments: str | Path) -> None:
    result = subprocess.run(["openssl", *map(str, arguments)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CertificateError(f"openssl {arguments[0]} failed:\n{result.stdout}{result.stderr}")
