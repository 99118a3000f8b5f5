"""The whole host IMA judgement, tvorch next to Keylime's `process_measurement_list`, on one list.

    .venv/bin/python benchmarks/ima_judge.py [--entries 50000] [--rounds 5] [--smoke]

Builds an ima-ng list in memory (a boot_aggregate over PCRs 0-9, then
ENTRIES - 1 files with sha256 digests, as benchmarks/ima_replay.py makes
them), an allowlist holding every path with its digest and one other, and
the quoted PCRs (0-9, and PCR 10 as the list replays). Then times, best of
ROUNDS, what `tvorch host attest` does with the list
(tvorch.core.attestation.ima.judge_ima_list: parse, template-hash check, replay to the
quoted PCR 10, boot_aggregate against PCRs 0-9, allowlist with the default
excludes), once from the binary list and once from the ASCII one, with the
compiled per-entry fold (_ima_fold.c) and, for information, with its Python
reference; and, in the
same run, Keylime 7.14.3's `keylime.ima.ima.process_measurement_list` on the
ASCII list as its verifier calls it (`check_ima`: the received text split
into lines, the split timed as tvorch's parse is) with the same allowlist (its runtime policy's digests, the same
excludes as regular expressions, the boot_aggregate digest, the sha256 bank),
in Keylime's own virtualenv ($TVORCH_KEYLIME_VENV, else
/var/cache/tvorch/keylime-venv; made by scripts/keylime-venv.sh when
missing). Both must pass the list and agree on PCR 10. For information it
also times a list with one entry the allowlist refuses (the general path,
which names every failure). Goals: >= 300,000 entries/s from each list, and
>= 4x Keylime's rate.

--smoke (what `make test` runs): 2,000 entries, 1 round, goals not judged;
the Keylime side runs only if its venv is there already.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from ima_replay import best, make_entries  # benchmarks/ is the script's directory

from tvorch.core.attestation import ima
from tvorch.core.attestation.hostpolicy import DEFAULT_EXCLUDES
from tvorch.core.attestation.ima import (
    IMA_PCR,
    ImaJudgement,
    boot_aggregate_digest,
    boot_aggregate_entry,
    judge_ima_list,
    replay_ima,
    to_ascii,
    to_binary,
)

REPO = Path(__file__).resolve().parent.parent
GOAL_RATE = 300_000
GOAL_RATIO = 4.0

# Runs in Keylime's venv: reads the job on stdin, prints seconds (best), PCR 10 and failures as JSON.
KEYLIME_DRIVER = r"""
import json, logging, sys, time
logging.disable(logging.CRITICAL)
from keylime.common.algorithms import Hash
from keylime.ima import ima
job = json.load(sys.stdin)
with open(job["list"]) as f:
    text = f.read()
policy = ima.empty_policy()
policy["digests"] = job["digests"]
policy["excludes"] = job["excludes"]
policy["ima"]["log_hash_alg"] = "sha1"  # the template hash of ima-ng entries
best, running, failures = None, "", []
for _ in range(job["rounds"]):
    fresh = json.loads(json.dumps(policy))  # Keylime adds the boot_aggregate to the policy it is given
    t0 = time.perf_counter()
    # As Keylime's verifier does with the list it receives (keylime/tpm/tpm_main.py: check_ima), split
    # included, just as tvorch's time includes reading the bytes it receives.
    running, failure = ima.process_measurement_list(None, text.split("\n"), fresh, job["pcr"], None,
                                                    {"sha256": [job["boot_aggregate"]]}, Hash.SHA256)
    elapsed = time.perf_counter() - t0
    best = elapsed if best is None else min(best, elapsed)
    failures = [e.event_id for e in failure.events] if failure else []
print(json.dumps({"seconds": best, "pcr": running, "failures": failures[:5], "count": len(failures)}))
"""


def keylime_python(smoke: bool) -> Path | None:
    venv = Path(os.environ.get("TVORCH_KEYLIME_VENV", "/var/cache/tvorch/keylime-venv"))
    if (venv / "bin" / "python").is_file() and any(venv.glob(".keylime-*")):
        return venv / "bin" / "python"
    if smoke:
        return None
    venv = Path("/var/cache/tvorch/keylime-bench-venv")
    proc = subprocess.run([str(REPO / "scripts" / "keylime-venv.sh"), str(venv)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ima_judge: cannot make Keylime's venv: {proc.stderr.strip()[-400:]}")
    return venv / "bin" / "python"


def keylime_run(python: Path, ascii_list: str, allowlist: dict[str, list[str]], pcr10: bytes,
                boot_aggregate: bytes, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tvbench-ima-") as tmp:
        path = Path(tmp) / "ascii_runtime_measurements"
        path.write_text(ascii_list)
        job = {"list": str(path), "digests": allowlist, "rounds": rounds, "pcr": pcr10.hex(),
               "excludes": [fnmatch.translate(g) for g in DEFAULT_EXCLUDES], "boot_aggregate": boot_aggregate.hex()}
        proc = subprocess.run([str(python), "-c", KEYLIME_DRIVER], input=json.dumps(job), capture_output=True,
                              text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"ima_judge: Keylime's run failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="2,000 entries, 1 round, goals not judged (make test)")
    args = ap.parse_args()
    if args.smoke:
        args.entries, args.rounds = 2_000, 1
    if args.entries < 2 or args.rounds < 1:
        ap.error("--entries must be at least 2 and --rounds at least 1")

    pcrs = {i: hashlib.sha256(b"boot PCR %d" % i).digest() for i in range(10)}
    aggregate = boot_aggregate_digest(pcrs, "sha256")
    entries = [boot_aggregate_entry(aggregate)] + make_entries(args.entries - 1)
    quoted = {**pcrs, IMA_PCR: replay_ima(entries, "sha256")}
    allowlist: dict[str, set[str]] = {}
    for e in entries[1:]:
        other = hashlib.sha256(e.file_digest).hexdigest()  # an older version of the file, also allowed
        allowlist.setdefault(e.path, set()).update((e.file_digest.hex(), other))
    allowed = {p: frozenset(d) for p, d in allowlist.items()}
    binary, ascii_list = to_binary(entries), to_ascii(entries)
    print(f"python {platform.python_version()} on {platform.machine()}; {len(entries):,} ima-ng entries "
          f"({len(binary) / 1e6:.1f} MB binary, {len(ascii_list) / 1e6:.1f} MB ASCII), "
          f"{len(allowed):,} allowlisted paths, best of {args.rounds}")

    def judge(data: bytes, allow: dict[str, frozenset[str]] = allowed) -> ImaJudgement:
        return judge_ima_list(data, "sha256", quoted, allow, (), DEFAULT_EXCLUDES)

    ascii_bytes = ascii_list.encode()
    t_bin, j_bin = best(args.rounds, lambda: judge(binary))
    t_ascii, j_ascii = best(args.rounds, lambda: judge(ascii_bytes))
    for j in (j_bin, j_ascii):
        assert j.problems == () and j.pcr_value == quoted[IMA_PCR], f"tvorch does not pass the list: {j.problems[:3]}"
    # For information: the same judgement with the Python reference of the compiled per-entry fold.
    compiled = ima._fold_plain is not ima._fold_reference
    ima._fold_plain, kept = ima._fold_reference, ima._fold_plain
    try:
        t_ref_bin, _ = best(args.rounds, lambda: judge(binary))
        t_ref_ascii, _ = best(args.rounds, lambda: judge(ascii_bytes))
    finally:
        ima._fold_plain = kept
    last = entries[-1]
    refusing = {**allowed, last.path: allowed[last.path] - {last.file_digest.hex()}}
    t_fail, j_fail = best(1, lambda: judge(binary, refusing))
    assert len(j_fail.problems) == 1 and last.path in j_fail.problems[0], j_fail.problems[:3]

    rate_bin, rate_ascii = len(entries) / t_bin, len(entries) / t_ascii
    print("parse + template hashes + replay to the quoted PCR 10 + boot_aggregate + allowlist:")
    fold = "compiled fold" if compiled else "NOT BUILT: Python fold"
    print(f"  tvorch, binary list      {t_bin * 1e3:7.1f} ms {rate_bin:>10,.0f} entries/s  ({fold})")
    print(f"  tvorch, ASCII list       {t_ascii * 1e3:7.1f} ms {rate_ascii:>10,.0f} entries/s  ({fold})")
    for form, t in (("binary", t_ref_bin), ("ASCII", t_ref_ascii)):
        print(f"  tvorch, {form + ' list':<16} {t * 1e3:7.1f} ms {len(entries) / t:>10,.0f} entries/s  "
              "(info: its Python reference fold)")
    print(f"  tvorch, one entry refused {t_fail * 1e3:6.1f} ms {len(entries) / t_fail:>10,.0f} entries/s  "
          "(info: the general path, which names each failure)")

    checks = {f"tvorch >= {GOAL_RATE:,} entries/s from each list": min(rate_bin, rate_ascii) >= GOAL_RATE}
    python = keylime_python(args.smoke)
    if python is None:
        print("  Keylime: skipped (--smoke and no Keylime venv; scripts/keylime-venv.sh makes one)")
    else:
        digests = {p: sorted(d) for p, d in allowlist.items()}
        kl = keylime_run(python, ascii_list, digests, quoted[IMA_PCR], aggregate, args.rounds)
        assert kl["count"] == 0, f"Keylime does not pass the list: {kl['failures']}"
        assert kl["pcr"] == quoted[IMA_PCR].hex(), "Keylime replays to another PCR 10"
        rate_kl = len(entries) / kl["seconds"]
        print(f"  Keylime 7.14.3, ASCII    {kl['seconds'] * 1e3:7.1f} ms {rate_kl:>10,.0f} entries/s  "
              "(process_measurement_list, same list, allowlist and PCRs)")
        print(f"ratio tvorch/Keylime: binary {rate_bin / rate_kl:.2f}x, ASCII {rate_ascii / rate_kl:.2f}x")
        checks[f"tvorch >= {GOAL_RATIO:g}x Keylime from each list"] = min(rate_bin, rate_ascii) / rate_kl >= GOAL_RATIO
    for what, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {what}{' (not judged: --smoke)' if args.smoke else ''}")
    return 0 if args.smoke or all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
