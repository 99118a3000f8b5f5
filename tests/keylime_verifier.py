"""A real Keylime 7.14.3 verifier for tests and benchmarks: from PyPI, in a cached venv, on 127.0.0.1.

scripts/keylime-venv.sh builds the venv (/var/cache/tvorch/keylime-venv);
its config comes from the sdist's templates (`keylime_upgrade_config
--defaults`), its database is SQLite in the run's own directory, its TLS CA
and server certificate are made at start (`tls_dir = generate`), and
/run/keylime (hard-coded by Keylime) is made. Stopped at the end: terminate,
then kill.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("TVORCH_KEYLIME_VENV", "/var/cache/tvorch/keylime-venv"))


class KeylimeUnavailable(Exception):
    """Keylime could not be installed or started here."""


@dataclass
class Verifier:
    url: str
    ca_file: Path
    log: Path
    pid: int

    def verifications(self) -> int:
        """How many TPM evidence verifications the verifier has run (its log's one line per request)."""
        return self.log.read_text(errors="replace").count("Checking one-shot attestation data")


def ensure_venv() -> Path:
    proc = subprocess.run([str(REPO / "scripts/keylime-venv.sh"), str(VENV)], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise KeylimeUnavailable(f"scripts/keylime-venv.sh failed: {proc.stderr.strip()[-500:]}")
    return VENV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def keylime_verifier(root: Path, port: int | None = None) -> Iterator[Verifier]:
    venv = ensure_venv()
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "cfg"
    cfg.mkdir(exist_ok=True)
    proc = subprocess.run([str(venv / "bin/keylime_upgrade_config"), "--defaults", "--templates",
                           str(venv / "templates"), "--out", str(cfg)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise KeylimeUnavailable(f"keylime_upgrade_config failed: {proc.stderr.strip()[-500:]}")
    port = port or _free_port()
    conf = cfg / "verifier.conf"
    text = conf.read_text()
    for key, value in (("ip", '"127.0.0.1"'), ("port", str(port)), ("num_workers", "1"),
                       ("tls_dir", "generate"), ("database_url", "sqlite")):
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
    conf.write_text(text)
    Path("/run/keylime").mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "KEYLIME_DIR": str(root), "KEYLIME_VERIFIER_CONFIG": str(conf),
           "KEYLIME_LOGGING_CONFIG": str(cfg / "logging.conf"), "KEYLIME_CA_CONFIG": str(cfg / "ca.conf")}
    log = root / "verifier.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(venv / "bin/keylime_verifier")], cwd=root, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise KeylimeUnavailable(f"keylime_verifier exited {server.returncode}: "
                                         f"{log.read_text(errors='replace')[-800:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise KeylimeUnavailable("keylime_verifier did not listen within 60 s") from None
                time.sleep(0.2)
        yield Verifier(f"https://127.0.0.1:{port}", root / "cv_ca" / "cacert.crt", log, server.pid)
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """Terminate the verifier's process group (it forks workers), then kill what is left."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=10)
