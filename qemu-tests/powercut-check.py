#!/usr/bin/env python3
"""Checks the power-cut test's console logs, boot after boot (qemu-tests/run.sh --power-cuts N).

    qemu-tests/powercut-check.py out/cut-0.log out/cut-1.log ...

Each boot prints what survived the previous cut (`PARSEC-CUT have PROVIDER NAME PUBHEX
sign=ok|fail`, then `inventory-done`), what the service's start-up said (`service-log
unnamed=N missing=N damaged=N`), then churns (`begin`/`ack` lines) until the power goes.
Across boots it must hold that:
  - every key whose creation was acknowledged, and not destroyed since, is there, with the
    public key it had, and still signs;
  - every key whose destruction was acknowledged stays gone;
  - no key appears that was never created (a key whose create or destroy was in flight at a
    cut may be there or not: either is correct);
  - the service reports no key file or token object that no entry names, no entry without
    its key file, and no damaged entry.
Prints one line per boot and a summary; exit status 1 on any violation.
"""

import sys


PUBLIC_HEX = 130  # an uncompressed P-256 point, in hex


def complete(words):
    """A churn line the cut did not truncate (the power may go in the middle of one)."""
    if len(words) < 4 or words[0] not in ("begin", "ack") or words[1] not in ("create", "destroy"):
        return False
    if words[0] == "ack" and words[1] == "create":
        return len(words) == 5 and len(words[4]) == PUBLIC_HEX
    return len(words) == 4


def parse(path):
    have, churn, log, done, threads = {}, [], None, False, 1
    with open(path, errors="replace") as f:
        for raw in f:
            if not raw.endswith("\n"):
                continue  # cut short by the power cut
            line = raw.strip().replace("\r", "")
            if not line.startswith("PARSEC-CUT "):
                continue
            words = line.split()
            kind = words[1]
            if kind == "have" and len(words) >= 6:
                have[(words[2], words[3])] = (words[4], words[5] == "sign=ok")
            elif kind == "inventory-done":
                done = True
            elif kind == "churn-started":
                fields = dict(w.split("=", 1) for w in words[2:] if "=" in w)
                threads = int(fields.get("threads", "1"))
            elif kind == "service-log":
                log = dict(w.split("=", 1) for w in words[2:])
            elif kind in ("begin", "ack") and complete(words[1:]):
                churn.append(words[1:])
    return have, churn, log, done, threads


def main(paths):
    expected = {}  # (provider, name) -> public key hex: acknowledged, not destroyed
    uncertain = set()  # in flight at the last cut
    gone = set()  # acknowledged destroys
    problems = []
    checked = acked = 0
    for boot, path in enumerate(paths):
        have, churn, log, done, threads = parse(path)
        if not done:
            problems.append(f"{path}: no inventory (the service or the check did not come up)")
            break
        lost = [k for k in expected if k not in have]
        changed = [k for k in expected if k in have and have[k][0] != expected[k]]
        unsigned = [k for k, (_, ok) in have.items() if not ok]
        back = [k for k in have if k in gone and k not in uncertain]
        unknown = [k for k in have if k not in expected and k not in uncertain and k not in gone]
        for what, keys in (("acknowledged key lost", lost), ("public key changed", changed),
                           ("key no longer signs", unsigned), ("destroyed key came back", back),
                           ("key never created", unknown)):
            for key in keys:
                problems.append(f"{path}: {what}: {key[0]} {key[1]}")
        if log is None:
            problems.append(f"{path}: no service-log line")
        else:
            for field in ("unnamed", "missing", "damaged"):
                if log.get(field, "0") != "0":
                    problems.append(f"{path}: the service reported {field}={log[field]}")
        checked += len(expected)
        # What survived is the new truth; then this boot's churn.
        expected = {k: v[0] for k, v in have.items()}
        uncertain = set()
        acks = 0
        # Thread T of the churn names keys pc-BOOT-tT-I with I counting up: in each thread,
        # the key after the last whose begin line is complete may have been started by a line
        # the cut truncated.
        maybe_started = set()
        for t in range(threads):
            prefix = f"pc-{boot}-t{t}-"
            started = [int(w[3][len(prefix):]) for w in churn
                       if w[0] == "begin" and w[1] == "create" and w[3].startswith(prefix)]
            following = f"{prefix}{max(started) + 1 if started else 0}"
            maybe_started |= {("mbed-crypto", following), ("tpm", following)}
        for words in churn:
            phase, op, provider, name = words[0], words[1], words[2], words[3]
            key = (provider, name)
            if phase == "begin":
                uncertain.add(key)
                if op == "destroy":
                    expected.pop(key, None)
            elif op == "create":
                expected[key] = words[4]
                uncertain.discard(key)
                acks += 1
            else:
                gone.add(key)
                uncertain.discard(key)
                acks += 1
        acked += acks
        print(f"   boot {boot}: {len(have)} keys found, {len(lost)} lost; then {acks} acknowledged operations, {len(uncertain)} in flight at the cut")
        uncertain |= maybe_started
    verdict = "PASS" if not problems else "FAIL"
    print(f"powercut-check: {verdict}: {len(paths) - 1} cuts, {checked} acknowledged keys checked after cuts, {acked} acknowledged operations")
    for problem in problems[:40]:
        print("   " + problem)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
