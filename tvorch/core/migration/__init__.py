"""Moving an instance between nodes (issue #18): the transport key that carries its vTPM key, the records and the ledger handoff."""
