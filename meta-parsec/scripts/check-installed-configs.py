#!/usr/bin/env python3
"""Runs the recipe's own parsec_make_config for every board and PACKAGECONFIG, and checks
each file it would install with the service's parser.

    meta-parsec/scripts/check-installed-configs.py PARSEC-BINARY

The recipe installs a board's config.toml without the [[provider]] tables of providers
that PACKAGECONFIG leaves out (so the QEMU board's config works in a build with the TPM
provider only), and stops the build when none would remain. That code only runs inside a
full image build, which CI cannot do; this script runs the same function body, taken from
the .bb file, with a minimal stand-in for bitbake's datastore, then:
  - every file it writes must pass `PARSEC --check-config` (PARSEC built with every provider)
    and name exactly the providers that are both in the board's file and built;
  - where no provider would remain, the function must stop with bb.fatal.
Exit status 0 only if all of that holds. No third-party Python.
"""

import itertools
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import tomllib

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(
    TOP, "meta-parsec", "recipes-security", "parsec-service", "parsec-service_0.1.0.bb"
)
# PACKAGECONFIG flag -> the provider_type it builds (the recipe's mapping, inverted).
FLAGS = {"tpm": "Tpm", "pkcs11": "Pkcs11", "mbed-crypto": "MbedCrypto"}


class Fatal(Exception):
    pass


class FakeBB:
    """What the function uses of the `bb` module."""

    def __init__(self):
        self.notes = []

    def fatal(self, message):
        raise Fatal(message)

    def note(self, message):
        self.notes.append(message)


class FakeData:
    """What the function uses of bitbake's datastore: getVar on plain strings."""

    def __init__(self, values):
        self.values = values

    def getVar(self, name):
        return self.values.get(name)


def recipe_function(name):
    """The body of `python NAME() { ... }` in the recipe, as a callable taking (d, bb)."""
    with open(RECIPE) as f:
        text = f.read()
    match = re.search(r"^python %s\(\) \{\n(.*?)^\}" % re.escape(name), text, re.M | re.S)
    if not match:
        sys.exit(f"{RECIPE}: no 'python {name}()' function")
    source = "def %s(d, bb):\n%s" % (name, textwrap.indent(textwrap.dedent(match.group(1)), "    "))
    scope = {}
    exec(compile(source, f"{RECIPE}:{name}", "exec"), scope)
    return scope[name]


def providers_in(path):
    """The provider_type of each [[provider]] table, in order (None where one has none)."""
    with open(path, "rb") as f:
        return [p.get("provider_type") for p in tomllib.load(f).get("provider", [])]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    parsec = sys.argv[1]
    make_config = recipe_function("parsec_make_config")
    sources = sorted(
        os.path.join("board-configs", board, "config.toml")
        for board in os.listdir(os.path.join(TOP, "board-configs"))
        if os.path.isfile(os.path.join(TOP, "board-configs", board, "config.toml"))
    ) + ["service/config/default.toml"]
    packageconfigs = [
        list(combo)
        for n in range(1, len(FLAGS) + 1)
        for combo in itertools.combinations(FLAGS, n)
    ]
    failures = 0
    checked = refused = 0
    with tempfile.TemporaryDirectory() as build:
        for source, packageconfig in itertools.product(sources, packageconfigs):
            label = f"{source} with PACKAGECONFIG \"{' '.join(packageconfig)}\""
            in_file = providers_in(os.path.join(TOP, source))
            expected = [p for p in in_file if any(FLAGS[f] == p for f in packageconfig)]
            output = os.path.join(build, "parsec-config.toml")
            if os.path.exists(output):
                os.remove(output)
            d = FakeData(
                {
                    "PARSEC_CONFIG": source,
                    "S": TOP,
                    "B": build,
                    "MACHINE": "test",
                    "PARSEC_BOARD": "",
                    "PACKAGECONFIG": " ".join(packageconfig),
                }
            )
            failures_before = failures
            try:
                make_config(d, FakeBB())
            except Fatal as fatal:
                if expected:
                    print(f"FAIL {label}: bb.fatal although {expected} are built: {fatal}")
                    failures += 1
                else:
                    refused += 1
                continue
            if not expected:
                print(f"FAIL {label}: no provider of {in_file} is built, yet a file was written")
                failures += 1
                continue
            try:
                got = providers_in(output)
            except tomllib.TOMLDecodeError as error:
                got = f"not TOML ({error})"
            if got != expected:
                print(f"FAIL {label}: installed providers {got}, expected {expected}")
                failures += 1
            left_out = [p for p in in_file if p not in expected]
            with open(output) as f:
                first = f.readline()
            if left_out and not first.startswith("# Built without"):
                print(f"FAIL {label}: left out {left_out} without saying so in its first line")
                failures += 1
            result = subprocess.run(
                [parsec, "--check-config", output], capture_output=True, text=True
            )
            if result.returncode != 0:
                print(f"FAIL {label}: parsec --check-config: {(result.stdout + result.stderr).strip()}")
                failures += 1
            if failures == failures_before:
                checked += 1
    print(
        f"installed configs: {len(sources)} sources x {len(packageconfigs)} PACKAGECONFIGs: "
        f"{checked} written as expected and accepted by parsec --check-config, {refused} refused at "
        f"build time (no provider built), {failures} failures"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
