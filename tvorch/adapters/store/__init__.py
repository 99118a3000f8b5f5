"""The SQLite store: every record tvorch keeps on a node, over one connection.

``Store`` is one object (one connection, one write lock) made of an area per
concern, each a small class in its own module:

=================  ==============================================================
module             what it keeps
=================  ==============================================================
``database``       the connection, the write transaction, the schema and its
                   migrations (``MIGRATIONS``, ``SCHEMA_VERSION``)
``instances``      instance records and their event history
``references``     trusted reference values, and the file digest cache
``manifests``      each instance's signed launch manifest
``gate``           the hook's decisions (hook_events) and runs (gate_runs)
``ledgers``        the hash-chained vTPM and NVRAM ledgers
``start_paths``    autostart, managed saves, the vTPM key lent for a start
``vtpms``          each instance's vTPM record
``evidence``       guest attestation: certified AKs, baselines, verified boots
``host``           host attestation verdicts and the daemon's heartbeat
``migrations``     live migration: rows out and in, handoffs, the journal, tombstones
=================  ==============================================================

Timestamps are ``core.timestamps.utc_now`` (also importable from here).
"""

from __future__ import annotations

from ...core.timestamps import utc_now
from .database import BUSY_TIMEOUT_MS, MIGRATIONS, SCHEMA_VERSION, Database
from .evidence import BASELINE_SOURCES, GuestEvidence
from .gate import Gate
from .host import HostRecords
from .instances import Instances
from .ledgers import LEDGERS, Ledgers
from .manifests import Manifests
from .migrations import Migrations
from .references import DigestCache, References
from .start_paths import StartPaths
from .vtpms import Vtpms

__all__ = ["BASELINE_SOURCES", "BUSY_TIMEOUT_MS", "LEDGERS", "MIGRATIONS", "SCHEMA_VERSION", "Database", "Store",
           "utc_now"]


class Store(Instances, References, DigestCache, Manifests, Gate, Ledgers, StartPaths, Vtpms, GuestEvidence,
            HostRecords, Migrations):
    """The state database with every area's reads and writes (see the module docstring for where each is)."""
