# The Parsec service's software provider runs its signatures, decryptions and exports on two
# threads when Mbed TLS's PSA core is thread-safe: Mbed TLS 3.6 built with
# MBEDTLS_THREADING_C and MBEDTLS_THREADING_PTHREAD (the service asks the library at start
# and uses one thread otherwise; meta-networking's recipe builds neither). A layer that is
# not a distro layer changes no other recipe by itself: this one changes mbedtls only when
# the distro or local.conf asks, with
#   PARSEC_MBEDTLS_THREADING = "1"
# (then mbedtls-threading.inc sets both options in mbedtls_config.h; they only add locking).
require ${@'mbedtls-threading.inc' if bb.utils.to_boolean(d.getVar('PARSEC_MBEDTLS_THREADING') or '0') else ''}
