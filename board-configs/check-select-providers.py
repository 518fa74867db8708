#!/usr/bin/env python3
"""Checks board-configs/select-providers, the filter meta-parsec's recipe and buildroot-ext's
package run on the config they install, for every board and every set of built providers.

    board-configs/check-select-providers.py PARSEC-BINARY

For each config.toml (every board's and the service's default) and each non-empty set of
providers (Tpm, Pkcs11, MbedCrypto), under each awk this machine has (gawk, mawk):
  - where the file names a built provider: the output names exactly those providers, in the
    file's order, says in its first line what it left out, and `PARSEC --check-config`
    (PARSEC built with every provider) accepts it;
  - where it names none: exit status 1 and a line on stderr.
Exit status 0 only if all of that holds. No third-party Python.
"""

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(TOP, "board-configs", "select-providers")
PROVIDERS = ["Tpm", "Pkcs11", "MbedCrypto"]


def providers_in(text):
    """The provider_type of each [[provider]] table, in order (None where one has none)."""
    return [p.get("provider_type") for p in tomllib.loads(text).get("provider", [])]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    parsec = sys.argv[1]
    sources = sorted(
        os.path.join("board-configs", board, "config.toml")
        for board in os.listdir(os.path.join(TOP, "board-configs"))
        if os.path.isfile(os.path.join(TOP, "board-configs", board, "config.toml"))
    ) + [os.path.join("service", "config", "default.toml")]
    originals = {}
    for source in sources:
        with open(os.path.join(TOP, source)) as f:
            originals[source] = f.read()
    sets = [list(c) for n in range(1, 4) for c in itertools.combinations(PROVIDERS, n)]
    awks = [a for a in ("gawk", "mawk") if shutil.which(a)]
    if not awks:
        sys.exit("check-select-providers: neither gawk nor mawk is installed")
    failures = accepted = refused = 0
    with tempfile.TemporaryDirectory() as scratch:
        output = os.path.join(scratch, "config.toml")
        for awk, source, built in itertools.product(awks, sources, sets):
            label = f"{source} built with {' '.join(built)} ({awk})"
            in_file = providers_in(originals[source])
            expected = [p for p in in_file if p in built]
            run = subprocess.run(
                ["sh", SCRIPT, os.path.join(TOP, source), *built],
                capture_output=True,
                text=True,
                env={**os.environ, "AWK": awk},
            )
            problems = []
            if not expected:
                if run.returncode != 1 or "none of its providers" not in run.stderr:
                    problems.append(
                        f"names none of them, yet exit {run.returncode}, stderr {run.stderr!r}"
                    )
                else:
                    refused += 1
            elif run.returncode != 0:
                problems.append(f"exit {run.returncode}: {run.stderr.strip()}")
            else:
                try:
                    got = providers_in(run.stdout)
                except tomllib.TOMLDecodeError as error:
                    got = f"not TOML ({error})"
                if got != expected:
                    problems.append(f"providers {got}, expected {expected}")
                left_out = [p for p in in_file if p not in built]
                said = run.stdout.startswith("# Built without ")
                if bool(left_out) != said:
                    problems.append(f"left out {left_out}, first line {run.stdout.splitlines()[0]!r}")
                with open(output, "w") as f:
                    f.write(run.stdout)
                check = subprocess.run([parsec, "--check-config", output], capture_output=True, text=True)
                if check.returncode != 0:
                    problems.append(f"parsec --check-config: {(check.stdout + check.stderr).strip()}")
                if not problems:
                    accepted += 1
            for problem in problems:
                print(f"FAIL {label}: {problem}")
            failures += len(problems)
    # Nothing dropped, nothing changed: a build with every provider installs the file as it is.
    for source, original in originals.items():
        run = subprocess.run(["sh", SCRIPT, os.path.join(TOP, source), *PROVIDERS], capture_output=True, text=True)
        if run.stdout != original:
            print(f"FAIL {source}: changed although every provider is built")
            failures += 1
    print(
        f"select-providers: {len(sources)} configs x {len(sets)} provider sets x {len(awks)} awks "
        f"({', '.join(awks)}): {accepted} outputs as expected and accepted by parsec --check-config, "
        f"{refused} refused (no provider built), {failures} failures"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
