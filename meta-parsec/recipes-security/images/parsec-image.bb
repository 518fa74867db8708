SUMMARY = "A small image with the Parsec service and its end-to-end check"
DESCRIPTION = "core-image-minimal plus the Parsec service (providers per PACKAGECONFIG, \
config per MACHINE from board-configs/), parsec-e2e and an SSH server for testimage."
LICENSE = "MIT"

require recipes-core/images/core-image-minimal.bb

IMAGE_INSTALL:append = " parsec-service parsec-service-e2e"
IMAGE_FEATURES:append = " ssh-server-dropbear"

# `bitbake -c testimage parsec-image`: boot, ping, ssh, then lib/oeqa/runtime/cases/parsec.py.
TEST_SUITES = "ping ssh parsec"
