################################################################################
#
# parsec-service
#
################################################################################

# The source: by default the git repository this external tree belongs to, at its HEAD
# commit (the download step clones it and vendors the crates of its Cargo.lock). To pin
# another commit or a mirror, set both on the make command line or in the environment:
#   make PARSEC_SERVICE_VERSION=<commit> PARSEC_SERVICE_SITE=<git url>
PARSEC_SERVICE_SITE ?= $(realpath $(BR2_EXTERNAL_PARSEC_PATH)/..)
PARSEC_SERVICE_VERSION ?= $(shell git -C $(BR2_EXTERNAL_PARSEC_PATH)/.. rev-parse HEAD 2>/dev/null)
PARSEC_SERVICE_SITE_METHOD = git
PARSEC_SERVICE_LICENSE = Apache-2.0
PARSEC_SERVICE_LICENSE_FILES = LICENSE

# The service and, if chosen, the end-to-end check, with the chosen providers only.
PARSEC_SERVICE_FEATURES = \
	$(if $(BR2_PACKAGE_PARSEC_SERVICE_TPM),parsec-service/tpm-provider) \
	$(if $(BR2_PACKAGE_PARSEC_SERVICE_PKCS11),parsec-service/pkcs11-provider) \
	$(if $(BR2_PACKAGE_PARSEC_SERVICE_MBED_CRYPTO),parsec-service/mbed-crypto-provider)

ifeq ($(BR2_PACKAGE_PARSEC_SERVICE_TPM),y)
PARSEC_SERVICE_DEPENDENCIES += tpm2-tss
# tss-esapi-sys ships bindings for aarch64 and x86_64 only; other CPUs generate them.
ifeq ($(BR2_aarch64)$(BR2_x86_64),)
PARSEC_SERVICE_FEATURES += parsec-service/tpm-generate-bindings
PARSEC_SERVICE_NEEDS_BINDGEN = y
endif
endif

ifeq ($(BR2_PACKAGE_PARSEC_SERVICE_MBED_CRYPTO),y)
# psa-crypto-sys builds Mbed TLS with cmake (its configure step is a Python script) and
# generates its bindings with bindgen. The build machine's cmake is used when it is new
# enough (BR2_CMAKE_HOST_DEPENDENCY, as package/rust does); host-cmake is built otherwise.
PARSEC_SERVICE_DEPENDENCIES += $(BR2_CMAKE_HOST_DEPENDENCY) host-python3
PARSEC_SERVICE_NEEDS_BINDGEN = y
endif

ifeq ($(PARSEC_SERVICE_NEEDS_BINDGEN),y)
PARSEC_SERVICE_DEPENDENCIES += host-clang
PARSEC_SERVICE_CARGO_ENV += \
	LIBCLANG_PATH=$(HOST_DIR)/lib \
	BINDGEN_EXTRA_CLANG_ARGS="--sysroot=$(STAGING_DIR)"
endif

# pkg-config (tpm2-tss) from the staging directory, for the target.
PARSEC_SERVICE_CARGO_ENV += PKG_CONFIG_ALLOW_CROSS=1

PARSEC_SERVICE_CARGO_BUILD_OPTS = \
	-p parsec-service \
	$(if $(BR2_PACKAGE_PARSEC_SERVICE_E2E),-p parsec-e2e) \
	--no-default-features \
	--features "$(subst $(space),$(comma),$(strip $(PARSEC_SERVICE_FEATURES)))"

PARSEC_SERVICE_BIN_DIR = $(@D)/target/$(RUSTC_TARGET_NAME)/$(if $(BR2_ENABLE_DEBUG),debug,release)
PARSEC_SERVICE_CONFIG_FILE = $(call qstrip,$(BR2_PACKAGE_PARSEC_SERVICE_CONFIG))

# The providers built in, as config.toml names them.
PARSEC_SERVICE_PROVIDERS = \
	$(if $(BR2_PACKAGE_PARSEC_SERVICE_TPM),Tpm) \
	$(if $(BR2_PACKAGE_PARSEC_SERVICE_PKCS11),Pkcs11) \
	$(if $(BR2_PACKAGE_PARSEC_SERVICE_MBED_CRYPTO),MbedCrypto)

# The configuration with the providers built in only (board-configs/select-providers drops
# the others' tables and says so in the file's first line), made before the long cargo
# build: a file naming none of them stops the build here, as the service would refuse it.
define PARSEC_SERVICE_SELECT_PROVIDERS
	config='$(if $(PARSEC_SERVICE_CONFIG_FILE),$(PARSEC_SERVICE_CONFIG_FILE),$(@D)/service/config/default.toml)'; \
	test -f "$$config" || { echo "parsec-service: configuration $$config: no such file"; exit 1; }; \
	sh $(@D)/board-configs/select-providers "$$config" $(PARSEC_SERVICE_PROVIDERS) \
		> $(@D)/parsec-config.toml || \
		{ echo "parsec-service: enable a provider $$config uses (BR2_PACKAGE_PARSEC_SERVICE_*)"; exit 1; }
endef
PARSEC_SERVICE_PRE_BUILD_HOOKS += PARSEC_SERVICE_SELECT_PROVIDERS

# A workspace has no single package for `cargo install`: install what was built.
define PARSEC_SERVICE_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(PARSEC_SERVICE_BIN_DIR)/parsec $(TARGET_DIR)/usr/bin/parsec
	$(PARSEC_SERVICE_INSTALL_E2E)
	$(INSTALL) -D -m 0640 $(@D)/parsec-config.toml $(TARGET_DIR)/etc/parsec/config.toml
endef

ifeq ($(BR2_PACKAGE_PARSEC_SERVICE_E2E),y)
define PARSEC_SERVICE_INSTALL_E2E
	$(INSTALL) -D -m 0755 $(PARSEC_SERVICE_BIN_DIR)/parsec-e2e $(TARGET_DIR)/usr/bin/parsec-e2e
endef
endif

define PARSEC_SERVICE_INSTALL_INIT_SYSV
	$(INSTALL) -D -m 0755 $(@D)/sysvinit/parsec $(TARGET_DIR)/etc/init.d/S50parsec
endef

define PARSEC_SERVICE_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/systemd/parsec.service \
		$(TARGET_DIR)/usr/lib/systemd/system/parsec.service
	$(INSTALL) -D -m 0644 $(@D)/systemd/parsec.socket \
		$(TARGET_DIR)/usr/lib/systemd/system/parsec.socket
	$(INSTALL) -D -m 0644 $(@D)/systemd/parsec-tmpfiles.conf \
		$(TARGET_DIR)/usr/lib/tmpfiles.d/parsec.conf
endef

# BusyBox mdev gives the kernel's resource manager to the group tss (the service's group for
# the TPM); the rule goes first in /etc/mdev.conf, where the first match wins. With eudev or
# systemd-udev, tpm2-tss's own udev rules (tpm-udev.rules) do the same.
ifeq ($(BR2_PACKAGE_PARSEC_SERVICE_TPM)$(BR2_ROOTFS_DEVICE_CREATION_DYNAMIC_MDEV),yy)
define PARSEC_SERVICE_MDEV_TPM_RULE
	grep -q '^tpmrm\[0-9\]+' $(TARGET_DIR)/etc/mdev.conf || \
		$(SED) '1i tpmrm[0-9]+\troot:tss 660' $(TARGET_DIR)/etc/mdev.conf
endef
PARSEC_SERVICE_TARGET_FINALIZE_HOOKS += PARSEC_SERVICE_MDEV_TPM_RULE
endif

# The service's own user, in tss for /dev/tpmrm0; the group parsec-clients (no user of
# its own) may use the socket: add applications' users to it.
define PARSEC_SERVICE_USERS
	parsec -1 parsec -1 * /var/lib/parsec - tss Parsec service
	- - parsec-clients -1 * - - - Parsec clients
endef

# /etc/parsec readable by the service only; the key store its own.
define PARSEC_SERVICE_PERMISSIONS
	/etc/parsec d 750 root parsec - - - - -
	/etc/parsec/config.toml f 640 root parsec - - - - -
	/var/lib/parsec d 700 parsec parsec - - - - -
endef

$(eval $(cargo-package))
