#!/bin/sh
# Post-build step for parsec_raspberrypi4_64_defconfig: the firmware's config.txt gets the
# lines that enable SPI and describe the SLB 9670 TPM (board-configs/raspberrypi4-64/config.txt),
# once. Runs after the rpi-firmware package has put config.txt in BINARIES_DIR.
set -eu
lines="${BR2_EXTERNAL_PARSEC_PATH}/../board-configs/raspberrypi4-64/config.txt"
config="${BINARIES_DIR}/rpi-firmware/config.txt"
[ -f "$config" ] || { echo "post-build-tpm.sh: no $config (is BR2_PACKAGE_RPI_FIRMWARE set?)" >&2; exit 1; }
grep -v '^#' "$lines" | while read -r line; do
    [ -n "$line" ] || continue
    grep -qxF "$line" "$config" || echo "$line" >> "$config"
done
