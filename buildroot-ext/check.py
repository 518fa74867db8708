#!/usr/bin/env python3
"""Checks the external tree's Kconfig and defconfigs with kconfiglib, without Buildroot.

    python3 buildroot-ext/check.py                     # CI: parse and check
    python3 buildroot-ext/check.py --update BUILDROOT  # refresh buildroot-symbols.txt

Buildroot's own `make X_defconfig` silently drops lines it does not know. Here:
  * Config.in (and what it sources) must parse with no warning: every symbol it
    depends on or selects is either ours or a Buildroot symbol listed in
    buildroot-symbols.txt (name and type, read from a real Buildroot tree by --update);
  * every line of every configs/*_defconfig must name a known symbol, and each of our
    symbols it sets must keep that value once dependencies are applied (a dropped line is
    an error, not a surprise in the image).
"""

import os
import re
import sys
import tempfile

import kconfiglib

HERE = os.path.dirname(os.path.abspath(__file__))
SYMBOLS = os.path.join(HERE, "buildroot-symbols.txt")
LINE = re.compile(r"^(?:(BR2_\w+)=(.*)|# (BR2_\w+) is not set)$")


def defconfigs():
    folder = os.path.join(HERE, "configs")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith("_defconfig"))


def referenced_symbols():
    """Every BR2_ symbol our Kconfig and defconfigs mention."""
    names = set()
    for root, _, files in os.walk(HERE):
        for name in files:
            if name == "Config.in" or name.endswith("_defconfig"):
                with open(os.path.join(root, name)) as f:
                    names.update(re.findall(r"\bBR2_\w+", f.read()))
    # BR2_EXTERNAL_* are make variables (paths), not Kconfig symbols.
    return {n for n in names if not n.startswith("BR2_EXTERNAL")}


def load_stubs():
    stubs = {}
    with open(SYMBOLS) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                fields = line.split()
                stubs[fields[1]] = (fields[0], fields[2] if len(fields) > 2 else None)
    return stubs


def check():
    stubs = load_stubs()
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        top = os.path.join(tmp, "Config.in")
        with open(top, "w") as f:
            f.write('mainmenu "parsec external tree check"\n')
            for name, (kind, default) in sorted(stubs.items()):
                # A prompt makes each stub settable, as the real symbol is; a default stands
                # for what Buildroot derives from the architecture and toolchain.
                f.write('config %s\n\t%s "%s"\n' % (name, kind, name))
                if default:
                    f.write('\tdefault %s\n' % default)
            f.write('menu "External options"\nsource "%s"\nendmenu\n'
                    % os.path.join(HERE, "Config.in"))
        os.environ["BR2_EXTERNAL_PARSEC_PATH"] = HERE
        os.environ["KCONFIG_WARN_UNDEF"] = "y"  # a reference to an undefined symbol warns
        os.environ["CONFIG_"] = ""  # Buildroot's .config lines are the bare symbol names
        kconf = kconfiglib.Kconfig(top, warn_to_stderr=False)
        for warning in kconf.warnings:
            problems.append("Config.in: " + warning.replace("\n", " "))
        ours = {name for name, sym in kconf.syms.items() if name not in stubs and sym.nodes}
        for path in defconfigs():
            label = os.path.relpath(path, os.path.dirname(HERE))
            wanted = {}
            with open(path) as f:
                for number, text in enumerate(f, 1):
                    text = text.strip()
                    if not text or (text.startswith("#") and not LINE.match(text)):
                        continue
                    match = LINE.match(text)
                    if not match:
                        problems.append("%s:%d: not a config line: %s" % (label, number, text))
                        continue
                    name = match.group(1) or match.group(3)
                    value = match.group(2) if match.group(1) else "n"
                    if name not in stubs and name not in ours:
                        problems.append("%s:%d: unknown symbol %s" % (label, number, name))
                        continue
                    wanted[name] = value.strip('"')
            kconf.load_config(path)
            for warning in kconf.warnings:
                if "Config.in" not in warning:
                    problems.append("%s: %s" % (label, warning.replace("\n", " ")))
            kconf.warnings.clear()
            for name, value in wanted.items():
                if name in ours and kconf.syms[name].str_value.strip('"') != value:
                    problems.append("%s: %s=%s is not kept (it becomes %r: a dependency is "
                                    "not met)" % (label, name, value, kconf.syms[name].str_value))
        print("buildroot-ext: %d symbols of ours, %d Buildroot symbols stubbed, %d defconfigs"
              % (len(ours), len(stubs), len(defconfigs())))
    if problems:
        for problem in problems:
            print("  " + problem, file=sys.stderr)
        return 1
    print("buildroot-ext: Config.in parses cleanly; every defconfig line is known and kept")
    return 0


def update(buildroot):
    """Types of the Buildroot symbols we use, read from a Buildroot tree's Kconfig files."""
    types = {}
    for root, _, files in os.walk(buildroot):
        if "/output" in root or "/.git" in root:
            continue
        for name in files:
            if not name.startswith("Config.in"):
                continue
            with open(os.path.join(root, name), errors="replace") as f:
                text = f.read()
            for m in re.finditer(r"^(?:menu)?config\s+(BR2_\w+)\s*\n\s*(bool|string|int|hex|tristate)",
                                 text, re.M):
                types.setdefault(m.group(1), m.group(2))
    ours = set(re.findall(r"^\s*config\s+(BR2_\w+)", open(os.path.join(HERE, "package", "parsec-service", "Config.in")).read(), re.M))
    needed = sorted(referenced_symbols() - ours)
    missing = [n for n in needed if n not in types]
    defaults = {n: d for n, (_, d) in load_stubs().items() if d} if os.path.exists(SYMBOLS) else {}
    if missing:
        sys.exit("not defined in %s: %s" % (buildroot, " ".join(missing)))
    with open(SYMBOLS, "w") as f:
        f.write("# Buildroot symbols the external tree uses, with their types: written by\n"
                "# `buildroot-ext/check.py --update BUILDROOT` from a Buildroot tree (a\n"
                "# symbol missing there stops the update). check.py stubs them. A third\n"
                "# column, kept by --update, is the value Buildroot derives for a symbol\n"
                "# a defconfig does not set (toolchain and architecture facts).\n")
        for name in needed:
            f.write(("%s %s %s" % (types[name], name, defaults.get(name, ""))).rstrip() + "\n")
    print("%s: %d symbols" % (SYMBOLS, len(needed)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--update":
        sys.exit(update(sys.argv[2]))
    if len(sys.argv) != 1:
        sys.exit(__doc__)
    sys.exit(check())
