SUMMARY = "Parsec service: hardware-backed keys for every application through one API"
SUMMARY:${PN}-e2e = "End-to-end check of a running Parsec service (for test images)"
DESCRIPTION = "A single-threaded daemon serving the Parsec wire protocol (PSA Crypto \
operations) on /run/parsec/parsec.sock. Each client's keys live in its own namespace, in a \
TPM 2.0 (tpm2-tss), a PKCS#11 token (HSM, secure element, YubiKey) or software (Mbed TLS)."
HOMEPAGE = "https://parallaxsecond.github.io/parsec-book/"
SECTION = "security"
# The service is Apache-2.0; the crates it is built from add the others.
LICENSE = "Apache-2.0 & MIT & BSD-3-Clause & ISC & Unicode-3.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"
# OE-core has no Unicode-3.0 text before wrynose: take it from a crate that carries it
# (PARSEC_UNICODE_LICENSE_FILE comes with the crate list, relative to ${S}).
NO_GENERIC_LICENSE[Unicode-3.0] = "${PARSEC_UNICODE_LICENSE_FILE}"

# The source: the release commit of this version (PV comes from the file name).
# scripts/release.sh pins it and checks, in CI, that the .deb and the Buildroot package
# carry the same version and that the crate list below is that commit's Cargo.lock.
# From a mirror: PARSEC_SRC_URI = "git://<your mirror>;protocol=https;branch=main".
# Development builds of the branch's head are opt-in, in local.conf:
#   PARSEC_SRCREV:pn-parsec-service = "${AUTOREV}"
#   PV:pn-parsec-service = "0.2.0+git"
# (regenerate the crate list from that commit's Cargo.lock: parsec-crates.py update).
PARSEC_SRC_URI ??= "git://${PARSEC_TOPDIR};protocol=file;branch=main"
SRC_URI = "${PARSEC_SRC_URI};destsuffix=git"
PARSEC_SRCREV ??= "942be4fbb76ac6cb695ed5426830551a8fa2519c"
SRCREV = "${PARSEC_SRCREV}"
S = "${@d.getVar('UNPACKDIR') or d.getVar('WORKDIR')}/git"

# Every crate of Cargo.lock with its checksum (meta-parsec/scripts/parsec-crates.py).
require ${BPN}-crates.inc

inherit cargo pkgconfig systemd update-rc.d useradd

# Providers. Default: the TPM when the distro has tpm2, and PKCS#11 (no build dependency:
# the token's module is loaded at run time). The software provider (mbed-crypto) links the
# build's own Mbed TLS (meta-networking's mbedtls, 3.6 LTS: its security updates reach the
# image with that recipe; this layer's mbedtls bbappend makes its PSA core thread-safe)
# and generates its bindings with bindgen, so it needs clang-native: meta-clang on
# scarthgap, OE-core itself from whinlatter on. It is a default only without tpm2, and
# only where a clang recipe exists.
def parsec_clang_available(d):
    return bool(bb.utils.which(d.getVar('BBPATH'), 'recipes-devtools/clang/clang_git.bb'))

def parsec_default_providers(d):
    if bb.utils.contains('DISTRO_FEATURES', 'tpm2', True, False, d):
        return 'tpm pkcs11'
    if parsec_clang_available(d):
        return 'mbed-crypto pkcs11'
    return 'pkcs11'

PACKAGECONFIG ??= "${@parsec_default_providers(d)}"
# tss-esapi-sys ships bindings made in advance for aarch64 and x86_64 (matched on CPU and
# OS, so *-poky-linux triples use them): no bindgen, no clang. Other CPUs generate them.
PARSEC_TSS_PREBUILT_ARCHS = "aarch64 x86_64"
PARSEC_TSS_BINDGEN = "${@'' if d.getVar('TARGET_ARCH') in d.getVar('PARSEC_TSS_PREBUILT_ARCHS').split() else 'clang-native'}"
# At run time: the libraries, the device TCTI (loaded by name), and meta-tpm's tpm2-tss package
# itself, which carries tpm-udev.rules (${nonarch_base_libdir}/udev/rules.d: /dev/tpmrm0 group
# tss, mode 0660, what the service opens as a member of tss) and creates the tss group.
PACKAGECONFIG[tpm] = ",,tpm2-tss ${PARSEC_TSS_BINDGEN},tpm2-tss libtss2 libtss2-mu libtss2-tcti-device"
PACKAGECONFIG[pkcs11] = ",,,"
PACKAGECONFIG[mbed-crypto] = ",,mbedtls clang-native"

# The providers PACKAGECONFIG enables: each one's cargo feature and its provider_type in
# config.toml.
def parsec_enabled_providers(d):
    providers = {
        'tpm': ('tpm-provider', 'Tpm'),
        'pkcs11': ('pkcs11-provider', 'Pkcs11'),
        'mbed-crypto': ('mbed-crypto-provider', 'MbedCrypto'),
    }
    return [providers[f] for f in d.getVar('PACKAGECONFIG').split() if f in providers]

def parsec_cargo_features(d):
    chosen = ['parsec-service/' + feature for feature, _ in parsec_enabled_providers(d)]
    if 'tpm' in d.getVar('PACKAGECONFIG').split() and \
            d.getVar('TARGET_ARCH') not in d.getVar('PARSEC_TSS_PREBUILT_ARCHS').split():
        chosen.append('parsec-service/tpm-generate-bindings')
    return ','.join(chosen)

PARSEC_CARGO_FEATURES = "${@parsec_cargo_features(d)}"
# The service and the end-to-end check (packaged apart, for test images), with the
# providers chosen above and no others.
CARGO_BUILD_FLAGS:append = " -p parsec-service -p parsec-e2e --no-default-features \
    ${@'--features ' + d.getVar('PARSEC_CARGO_FEATURES') if d.getVar('PARSEC_CARGO_FEATURES') else ''}"
# The workspace's release profile strips; the image's debug packages need the symbols.
export CARGO_PROFILE_RELEASE_STRIP = "false"
# For bindgen (software provider, or TPM bindings on other CPUs): clang-native's libclang,
# headers from the target sysroot.
export LIBCLANG_PATH = "${STAGING_LIBDIR_NATIVE}"
export BINDGEN_EXTRA_CLANG_ARGS = "--sysroot=${RECIPE_SYSROOT}"
# psa-crypto-sys links the recipe sysroot's libmbedcrypto (dynamically: the .so is there)
# instead of building the copy it carries (Mbed TLS 3.0.0).
export MBEDTLS_LIB_DIR = "${STAGING_LIBDIR}"
export MBEDTLS_INCLUDE_DIR = "${STAGING_INCDIR}"

# The binding compiles against its own config, not the library's: check that every PSA
# type the service passes has the library's layout (scripts/mbedtls-abi.sh; the build
# machine's compiler, the target's headers).
do_compile:prepend() {
    if ${@bb.utils.contains('PACKAGECONFIG', 'mbed-crypto', 'true', 'false', d)}; then
        CC="${BUILD_CC}" PSA_CRYPTO_SYS_DIR="${CARGO_VENDORING_DIRECTORY}/psa-crypto-sys-0.12.0" \
            bash ${S}/scripts/mbedtls-abi.sh ${STAGING_INCDIR} ||
            bbfatal "psa-crypto-sys does not match ${STAGING_INCDIR}'s Mbed TLS (see above)"
    fi
}

python () {
    # Say why at parse time rather than "Nothing PROVIDES 'clang-native'".
    features = d.getVar('PARSEC_CARGO_FEATURES').split(',')
    why = []
    if 'parsec-service/mbed-crypto-provider' in features:
        why.append('the software provider (PACKAGECONFIG mbed-crypto)')
    if 'parsec-service/tpm-generate-bindings' in features:
        why.append('the TPM provider on %s (tss-esapi has no bindings made in advance for '
                   'it)' % d.getVar('TARGET_ARCH'))
    if why and not parsec_clang_available(d):
        raise bb.parse.SkipRecipe('%s needs bindgen, so clang-native, which no layer provides: '
                                  'add meta-clang (scarthgap) or change PACKAGECONFIG'
                                  % ' and '.join(why))
}

# The configuration: the MACHINE's directory in board-configs/ (generic-tpm for another
# MACHINE when the TPM provider is built), or PARSEC_CONFIG (a path in the source tree, or
# absolute). Providers it names that are not built in are left out of the installed file,
# which says so in its first line.
def parsec_board_for_machine(d):
    boards = {
        'qemuarm64': 'qemu-aarch64',
        'raspberrypi4-64': 'raspberrypi4-64',
        'imx8mp-lpddr4-evk': 'imx8mp-evk-yubikey',
    }
    board = boards.get(d.getVar('MACHINE'), '')
    if not board and bb.utils.contains('PACKAGECONFIG', 'tpm', True, False, d):
        board = 'generic-tpm'  # the TPM at /dev/tpmrm0, nothing else
    return board

PARSEC_BOARD ??= "${@parsec_board_for_machine(d)}"
PARSEC_CONFIG ??= "${@'board-configs/%s/config.toml' % d.getVar('PARSEC_BOARD') if d.getVar('PARSEC_BOARD') else 'service/config/default.toml'}"

# The providers built in, as config.toml names them.
PARSEC_BUILT_PROVIDERS = "${@' '.join(kind for _, kind in parsec_enabled_providers(d))}"

do_install:append() {
    # The board's config with the providers this build has (board-configs/select-providers
    # drops the others' tables and says so in the file's first line; it fails when none
    # would be left).
    config="${PARSEC_CONFIG}"
    case "$config" in
        /*) ;;
        *) config="${S}/$config" ;;
    esac
    [ -f "$config" ] || bbfatal "PARSEC_CONFIG: no such file $config (MACHINE ${MACHINE}, PARSEC_BOARD '${PARSEC_BOARD}')"
    sh ${S}/board-configs/select-providers "$config" ${PARSEC_BUILT_PROVIDERS} > ${B}/parsec-config.toml ||
        bbfatal "$config: no provider it names is built: PACKAGECONFIG is '${PACKAGECONFIG}'"

    # /etc/parsec: the service reads it (group parsec), nobody else.
    install -d -m 0750 ${D}${sysconfdir}/parsec
    install -m 0640 ${B}/parsec-config.toml ${D}${sysconfdir}/parsec/config.toml
    chgrp -R parsec ${D}${sysconfdir}/parsec

    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/parsec.service ${S}/systemd/parsec.socket ${D}${systemd_system_unitdir}/
    install -D -m 0644 ${S}/systemd/parsec-tmpfiles.conf ${D}${nonarch_libdir}/tmpfiles.d/parsec.conf

    install -D -m 0755 ${S}/sysvinit/parsec ${D}${sysconfdir}/init.d/parsec
}

# The service's own user, in tss for /dev/tpmrm0; parsec-clients may use the socket.
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system parsec; --system parsec-clients; --system tss"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/parsec --no-create-home \
    --shell /sbin/nologin --gid parsec --groups tss parsec"

SYSTEMD_SERVICE:${PN} = "parsec.socket parsec.service"
INITSCRIPT_NAME = "parsec"
INITSCRIPT_PARAMS = "defaults 70 30"

PACKAGES =+ "${PN}-e2e"
FILES:${PN} += "${nonarch_libdir}/tmpfiles.d/parsec.conf"
FILES:${PN}-e2e += "${bindir}/parsec-e2e"
CONFFILES:${PN} = "${sysconfdir}/parsec/config.toml"
RDEPENDS:${PN}-e2e = "${PN}"
