"""The HTTP client of a Keylime verifier: one `POST /v2.4/verify/evidence` over TLS (stdlib only).

Keylime serves TLS only; its CA (keylime.ca_file) authenticates the verifier,
and a client certificate (keylime.client_cert / client_key) is sent when
configured (the verifier may ask for one). A connection that fails or times
out is KeylimeUnreachable, which the caller retries (adapters.retry) and
queues; an answer without a verdict is an EvidenceError.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from typing import Any

from ..core.attestation.keylime import EVIDENCE_PATH, KeylimeVerdict, parse_answer
from ..errors import ConfigError, KeylimeUnreachable

MAX_ANSWER = 4 * 1024 * 1024


class KeylimeClient:
    """One verifier URL; a connection per submission (a pool of verifiers sits behind one URL)."""

    def __init__(self, url: str, ca_file: str, client_cert: str = "", client_key: str = "",
                 timeout: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"keylime.verifier_url must be https://HOST:PORT (Keylime serves TLS only), not {url!r}")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 8881, timeout
        self.path = parts.path.rstrip("/") + EVIDENCE_PATH
        try:
            self.context = ssl.create_default_context(cafile=ca_file or None)
            if client_cert:
                self.context.load_cert_chain(client_cert, client_key or None)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"cannot set up TLS to the Keylime verifier: {err}") from None

    def verify(self, payload: dict[str, Any]) -> KeylimeVerdict:
        body = json.dumps(payload).encode()
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
        try:
            conn.request("POST", self.path, body, {"Content-Type": "application/json"})
            answer = conn.getresponse()
            data = answer.read(MAX_ANSWER)
            status = answer.status
        except ssl.SSLCertVerificationError as err:
            raise KeylimeUnreachable(f"the Keylime verifier's certificate is not trusted: {err.verify_message}") from None
        except (OSError, http.client.HTTPException) as err:
            raise KeylimeUnreachable(f"Keylime verifier {self.host}:{self.port} unreachable: {err}") from None
        finally:
            conn.close()
        return parse_answer(status, data)
