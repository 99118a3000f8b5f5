"""Judging evidence: event logs, IMA, TPM quotes, AK certification, guest baselines, host policy and verdicts, the evidence bundle, the guest agent protocol, Keylime's formats."""
