# qemuarm64 with the tpm2 distro feature: the kernel drives QEMU's tpm-tis-device, which
# the Parsec service's TPM provider uses through /dev/tpmrm0 (testimage attaches swtpm).
# The fragment is the QEMU board's own (board-configs/qemu-aarch64/kernel.cfg).
SRC_URI:append:qemuarm64 = "${@bb.utils.contains('DISTRO_FEATURES', 'tpm2', ' file://${PARSEC_TOPDIR}/board-configs/qemu-aarch64/kernel.cfg', '', d)}"
