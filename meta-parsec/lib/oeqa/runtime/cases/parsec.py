#
# SPDX-License-Identifier: Apache-2.0
#
"""The Parsec service on a running image (testimage): it runs, and the end-to-end check
passes against it before and after a restart (the keys made before are still there)."""

from oeqa.core.decorator.depends import OETestDepends
from oeqa.runtime.case import OERuntimeTestCase
from oeqa.runtime.decorator.package import OEHasPackage

KEEP = "/tmp/parsec-e2e"


class ParsecServiceTest(OERuntimeTestCase):
    def restart(self):
        """Restarts the service with whichever init system the image has."""
        status, _ = self.target.run("command -v systemctl")
        if status == 0:
            command = "systemctl restart parsec.service"
        else:
            command = "/etc/init.d/parsec restart"
        status, output = self.target.run(command)
        self.assertEqual(status, 0, msg="%s failed:\n%s" % (command, output))
        # The socket is back when the service answers.
        status, output = self.target.run(
            "for i in $(seq 50); do [ -S /run/parsec/parsec.sock ] && exit 0; sleep 0.2; done; exit 1"
        )
        self.assertEqual(status, 0, msg="no socket after the restart:\n%s" % self.service_log())

    def service_log(self):
        _, output = self.target.run(
            "journalctl -u parsec --no-pager -n 50 2>/dev/null || tail -n 50 /var/log/parsec.log"
        )
        return output

    def e2e(self, command):
        status, output = self.target.run("parsec-e2e %s --keep %s" % (command, KEEP), timeout=300)
        failed = [line for line in output.splitlines() if " result=fail " in line]
        msg = "parsec-e2e %s: exit %d, failed steps:\n%s\n\nfull output:\n%s\n\nservice log:\n%s" % (
            command, status, "\n".join(failed), output, self.service_log())
        self.assertEqual(status, 0, msg=msg)
        self.assertIn("summary passed=", output, msg=msg)
        self.assertIn(" failed=0", output, msg=msg)

    @OEHasPackage(["parsec-service"])
    def test_parsec_config_valid(self):
        status, output = self.target.run("parsec --check-config /etc/parsec/config.toml")
        self.assertEqual(status, 0, msg=output)

    @OETestDepends(["parsec.ParsecServiceTest.test_parsec_config_valid"])
    @OEHasPackage(["parsec-service-e2e"])
    def test_parsec_end_to_end(self):
        # A TPM board's config needs a TPM: say so plainly rather than fail obscurely.
        status, config = self.target.run("cat /etc/parsec/config.toml")
        if 'provider_type = "Tpm"' in config:
            status, _ = self.target.run("test -c /dev/tpmrm0")
            self.assertEqual(status, 0, msg="the config uses the TPM but the image has no "
                             "/dev/tpmrm0: attach swtpm (meta-parsec/README.md, testimage)")
        self.restart()
        self.e2e("run")
        self.restart()
        self.e2e("check")
