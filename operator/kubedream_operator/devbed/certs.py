"""The test bed's PKI and kubeconfig, made with the openssl command line tool.

One CA signs a serving certificate (kube-apiserver and kube-controller-manager, valid for
127.0.0.1 and the in-cluster `kubernetes` names) and the admin client certificate
(O=system:masters). A separate RSA key pair signs service-account tokens. Everything lives in
DIR/pki and is reused by later `kubedream dev up` runs. Called by devbed.bed.

openssl rather than the `cryptography` package: it is always present where Go and the test bed
are, and it keeps a test-only concern out of the package's dependencies.
"""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

ADMIN_USER = "kubedream-admin"
SERVICE_CIDR_FIRST_IP = "10.0.0.1"
_SERVING_NAMES = (
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
    "IP:127.0.0.1",
    f"IP:{SERVICE_CIDR_FIRST_IP}",
)
_DAYS = "3650"


@dataclass(frozen=True)
class Pki:
    """Paths of the key material in DIR/pki."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.dir / "serving.crt"

    @property
    def serving_key(self) -> Path:
        return self.dir / "serving.key"

    @property
    def admin_cert(self) -> Path:
        return self.dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.dir / "admin.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _ec_key(path: Path) -> None:
    _openssl(
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-out",
        str(path),
        cwd=path.parent,
    )
    path.chmod(0o600)


def _signed_cert(pki: Pki, key: Path, cert: Path, subject: str, extensions: list[str]) -> None:
    """Sign a certificate for `key` with the CA, via a CSR and an extensions file."""
    csr = cert.with_suffix(".csr")
    ext = cert.with_suffix(".ext")
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr), cwd=pki.dir)
    ext.write_text("\n".join(extensions) + "\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki.ca_cert), "-CAkey", str(pki.ca_key),
        "-CAcreateserial", "-days", _DAYS, "-sha256", "-extfile", str(ext), "-out", str(cert),
        cwd=pki.dir,
    )  # fmt: skip
    csr.unlink()
    ext.unlink()


def ensure_pki(directory: Path) -> Pki:
    """Create whatever key material is missing under `directory` and return its paths."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    if not (pki.ca_cert.is_file() and pki.ca_key.is_file()):
        _ec_key(pki.ca_key)
        _openssl(
            "req", "-x509", "-new", "-key", str(pki.ca_key), "-subj", "/CN=kubedream-dev-ca",
            "-days", _DAYS, "-sha256", "-out", str(pki.ca_cert),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=directory,
        )  # fmt: skip
        for stale in (pki.serving_cert, pki.admin_cert):
            stale.unlink(missing_ok=True)
    if not pki.serving_cert.is_file():
        _ec_key(pki.serving_key)
        _signed_cert(
            pki, pki.serving_key, pki.serving_cert, "/CN=kubedream-dev-serving",
            ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
             "extendedKeyUsage=serverAuth", "subjectAltName=" + ",".join(_SERVING_NAMES)],
        )  # fmt: skip
    if not pki.admin_cert.is_file():
        _ec_key(pki.admin_key)
        _signed_cert(
            pki, pki.admin_key, pki.admin_cert, f"/O=system:masters/CN={ADMIN_USER}",
            ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
             "extendedKeyUsage=clientAuth"],
        )  # fmt: skip
    if not (pki.sa_key.is_file() and pki.sa_pub.is_file()):
        _openssl(
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            str(pki.sa_key),
            cwd=directory,
        )
        pki.sa_key.chmod(0o600)
        _openssl("pkey", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub), cwd=directory)
    return pki


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, pki: Pki, context: str = "kubedream-dev") -> None:
    """Write an admin kubeconfig for `server` with the certificates embedded, so the file can be
    copied anywhere."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": context,
                "cluster": {"server": server, "certificate-authority-data": _b64(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": ADMIN_USER,
                "user": {
                    "client-certificate-data": _b64(pki.admin_cert),
                    "client-key-data": _b64(pki.admin_key),
                },
            }
        ],
        "contexts": [{"name": context, "context": {"cluster": context, "user": ADMIN_USER}}],
        "current-context": context,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
