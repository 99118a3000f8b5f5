"""Per-instance vTPM records: the record and its keys, the state ledger, sealing, escrow, backups, EK and platform certificates."""
