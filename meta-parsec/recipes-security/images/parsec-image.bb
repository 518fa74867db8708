SUMMARY = "A small image with the Parsec service and its end-to-end check"
DESCRIPTION = "A minimal console image with the Parsec service (providers per \
PACKAGECONFIG, config per MACHINE from board-configs/), parsec-e2e and an SSH server for \
testimage."
LICENSE = "MIT"

IMAGE_FEATURES += "ssh-server-dropbear"
IMAGE_INSTALL = "packagegroup-core-boot parsec-service parsec-service-e2e ${CORE_IMAGE_EXTRA_INSTALL}"
IMAGE_LINGUAS = ""

inherit core-image

# `bitbake -c testimage parsec-image`: boot, ping, ssh, then lib/oeqa/runtime/cases/parsec.py.
TEST_SUITES = "ping ssh parsec"
