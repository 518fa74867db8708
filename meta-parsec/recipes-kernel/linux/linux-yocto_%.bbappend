# qemuarm64 with the tpm2 distro feature: the kernel drives QEMU's tpm-tis-device, which
# the Parsec service's TPM provider uses through /dev/tpmrm0 (testimage attaches swtpm).
FILESEXTRAPATHS:prepend := "${THISDIR}/files:"
SRC_URI:append:qemuarm64 = "${@bb.utils.contains('DISTRO_FEATURES', 'tpm2', ' file://parsec-tpm-tis.cfg', '', d)}"
