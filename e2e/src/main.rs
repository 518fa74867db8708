//! `parsec-e2e`: the end-to-end check a device runs against its own Parsec service.
//!
//! It talks to the service the way every application does (parsec-client, the default
//! socket or `PARSEC_SERVICE_ENDPOINT`, the authenticator the service offers) and prints one
//! machine-readable line per step, so that a host reading a serial console, or Yocto's
//! `testimage`, can tell exactly what passed:
//!
//! ```text
//! PARSEC-E2E step=sign-ecc result=pass ms=41 detail=64-byte signature
//! PARSEC-E2E summary passed=14 failed=0
//! ```
//!
//! `run` exercises the provider under test (by default the service's first provider) from
//! ping to destroy and keeps three keys, whose public keys it writes to `--keep DIR`;
//! `check` (after a restart or a reboot) proves those keys are still there and still the
//! same keys: each signs or decrypts, checked against the saved public key. Public-key
//! checks run on the software provider (MbedCrypto) when the service offers it, so a
//! signature the TPM made is verified by a different implementation; otherwise on the
//! provider under test, with the public key imported as a separate key. The exit status is 0 only if every step passed.

mod churn;

use parsec_client::core::interface::operations::list_providers::Uuid;
use parsec_client::core::interface::operations::psa_algorithm::{
    Algorithm, AsymmetricEncryption, AsymmetricSignature, Hash,
};
use parsec_client::core::interface::operations::psa_key_attributes::{
    Attributes, EccFamily, Lifetime, Policy, Type, UsageFlags,
};
use parsec_client::core::interface::requests::{ProviderId, ResponseStatus};
use parsec_client::error::Error as ClientError;
use parsec_client::BasicClient;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "usage: parsec-e2e run|check [--keep DIR] [--provider tpm|pkcs11|mbed-crypto]

  run    every operation on the provider under test; keeps keys e2e-ecc, e2e-rsa and
         e2e-rsa-enc and writes their public keys to DIR (default /var/lib/parsec-e2e)
  check  the kept keys are listed, export the saved public keys and still sign/decrypt
  inventory, churn BOOT  the power-cut test's guest side (see churn.rs)
  --provider  the provider under test; default: the service's first provider

Environment: PARSEC_SERVICE_ENDPOINT=unix:/path/to/socket (default /run/parsec/parsec.sock).
Output: one line per step, 'PARSEC-E2E step=NAME result=pass|fail ms=N detail=TEXT', then
'PARSEC-E2E summary passed=N failed=M'. Exit status 0 only if every step passed.";

/// The keys `run` keeps for `check`, with what each is for.
const KEPT: [(&str, KeyKind); 3] = [
    ("e2e-ecc", KeyKind::EccSign),
    ("e2e-rsa", KeyKind::RsaSign),
    ("e2e-rsa-enc", KeyKind::RsaEncrypt),
];
/// A key made only to be destroyed.
const SCRATCH: &str = "e2e-scratch";
/// Public keys imported into the verifier to check the provider under test.
const PUBLIC_COPY: &str = "e2e-public-copy";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut command = None;
    let mut keep = PathBuf::from("/var/lib/parsec-e2e");
    let mut provider = None;
    let mut boot = String::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "run" | "check" | "inventory" if command.is_none() => command = Some(arg.clone()),
            "churn" if command.is_none() => {
                command = Some(arg.clone());
                boot = rest.next().cloned().unwrap_or_else(|| "0".into());
            }
            "--keep" => match rest.next() {
                Some(dir) => keep = PathBuf::from(dir),
                None => return usage("--keep needs a directory"),
            },
            "--provider" => match rest.next().map(String::as_str) {
                Some("tpm") => provider = Some(ProviderId::Tpm),
                Some("pkcs11") => provider = Some(ProviderId::Pkcs11),
                Some("mbed-crypto") => provider = Some(ProviderId::MbedCrypto),
                _ => return usage("--provider is tpm, pkcs11 or mbed-crypto"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unexpected argument {other}")),
        }
    }
    let Some(command) = command else {
        return usage("say run or check");
    };
    match command.as_str() {
        "inventory" => return churn::inventory(),
        "churn" => return churn::churn(&boot),
        _ => {}
    }

    let mut report = Report::default();
    let Some(mut check) = report.step("connect", || Check::connect(provider)) else {
        return report.finish();
    };
    if command == "run" {
        check.run(&mut report, &keep);
    } else {
        check.check(&mut report, &keep);
    }
    report.finish()
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("parsec-e2e: {problem}\n{USAGE}");
    ExitCode::from(2)
}

/// Counts steps and prints one line for each.
#[derive(Default)]
struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    /// Runs one step; its `Ok` text is the detail printed. Returns the step's value if it
    /// passed.
    fn step<T: Detail>(&mut self, name: &str, f: impl FnOnce() -> Result<T, String>) -> Option<T> {
        let started = Instant::now();
        let outcome = f();
        let ms = started.elapsed().as_millis();
        let (result, detail, value) = match outcome {
            Ok(value) => {
                self.passed += 1;
                ("pass", value.detail(), Some(value))
            }
            Err(why) => {
                self.failed += 1;
                ("fail", why, None)
            }
        };
        // One line, whatever the detail holds.
        let detail = detail.replace(['\n', '\r'], " ");
        println!("PARSEC-E2E step={name} result={result} ms={ms} detail={detail}");
        value
    }

    fn finish(&self) -> ExitCode {
        println!(
            "PARSEC-E2E summary passed={} failed={}",
            self.passed, self.failed
        );
        if self.failed == 0 && self.passed > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// What a step's value says about itself in the report.
trait Detail {
    fn detail(&self) -> String;
}
impl Detail for String {
    fn detail(&self) -> String {
        self.clone()
    }
}
impl Detail for Vec<u8> {
    fn detail(&self) -> String {
        format!("{} bytes", self.len())
    }
}
impl Detail for Check {
    fn detail(&self) -> String {
        format!(
            "provider under test {:?}, public-key checks on {:?}, auth {:?}",
            self.provider,
            self.verifier,
            self.client.auth_data()
        )
    }
}

#[derive(Clone, Copy)]
enum KeyKind {
    EccSign,
    RsaSign,
    RsaEncrypt,
}

impl KeyKind {
    fn algorithm(self) -> Algorithm {
        match self {
            KeyKind::EccSign => AsymmetricSignature::Ecdsa {
                hash_alg: Hash::Sha256.into(),
            }
            .into(),
            KeyKind::RsaSign => AsymmetricSignature::RsaPss {
                hash_alg: Hash::Sha256.into(),
            }
            .into(),
            KeyKind::RsaEncrypt => AsymmetricEncryption::RsaOaep {
                hash_alg: Hash::Sha256,
            }
            .into(),
        }
    }

    fn signature(self) -> Option<AsymmetricSignature> {
        match self.algorithm() {
            Algorithm::AsymmetricSignature(alg) => Some(alg),
            _ => None,
        }
    }

    /// Attributes of the key pair, or of its public key alone.
    fn attributes(self, public: bool) -> Attributes {
        let (key_type, bits) = match (self, public) {
            (KeyKind::EccSign, false) => (
                Type::EccKeyPair {
                    curve_family: EccFamily::SecpR1,
                },
                256,
            ),
            (KeyKind::EccSign, true) => (
                Type::EccPublicKey {
                    curve_family: EccFamily::SecpR1,
                },
                256,
            ),
            (_, false) => (Type::RsaKeyPair, 2048),
            (_, true) => (Type::RsaPublicKey, 2048),
        };
        let mut usage_flags = UsageFlags::default();
        match (self, public) {
            (KeyKind::RsaEncrypt, false) => usage_flags.set_encrypt().set_decrypt(),
            (KeyKind::RsaEncrypt, true) => usage_flags.set_encrypt(),
            (_, false) => usage_flags.set_sign_hash().set_verify_hash(),
            (_, true) => usage_flags.set_verify_hash(),
        };
        Attributes {
            lifetime: Lifetime::Persistent,
            key_type,
            bits,
            policy: Policy {
                usage_flags,
                permitted_algorithms: self.algorithm(),
            },
        }
    }
}

/// A connected client and the provider under test.
struct Check {
    client: BasicClient,
    provider: ProviderId,
    /// Where public keys are imported to check the provider under test: the software
    /// provider when the service offers it, else the provider under test itself.
    verifier: ProviderId,
}

impl Check {
    fn connect(provider: Option<ProviderId>) -> Result<Check, String> {
        // BasicClient::new asks the service for its authenticators and providers, as an
        // application does.
        let mut client = BasicClient::new(Some("parsec-e2e".to_string())).map_err(text)?;
        let provider = provider.unwrap_or_else(|| client.implicit_provider());
        client.set_implicit_provider(provider);
        let offered: Vec<ProviderId> = client
            .list_providers()
            .map_err(text)?
            .iter()
            .map(|p| p.id)
            .collect();
        let verifier = if offered.contains(&ProviderId::MbedCrypto) {
            ProviderId::MbedCrypto
        } else {
            provider
        };
        Ok(Check {
            client,
            provider,
            verifier,
        })
    }

    /// Every operation, then the keys `check` looks for.
    fn run(&mut self, report: &mut Report, keep: &Path) {
        report.step("ping", || {
            let (major, minor) = self.client.ping().map_err(text)?;
            Ok(format!("wire protocol {major}.{minor}"))
        });
        report.step("list-providers", || self.list_providers());
        report.step("clean", || self.clean());
        for (name, kind) in KEPT {
            let created = report.step(&format!("create-{}", short(name)), || {
                self.client
                    .psa_generate_key(name, kind.attributes(false))
                    .map_err(text)?;
                Ok(format!("{name} on {:?}", self.provider))
            });
            if created.is_none() {
                continue;
            }
            let Some(public) = report.step(&format!("export-public-{}", short(name)), || {
                self.client.psa_export_public_key(name).map_err(text)
            }) else {
                continue;
            };
            if let Some(alg) = kind.signature() {
                report.step(&format!("sign-verify-{}", short(name)), || {
                    self.sign_and_verify(name, alg)
                });
                report.step(&format!("verify-with-public-{}", short(name)), || {
                    self.verify_with_public(name, kind, &public)
                });
            } else {
                report.step(&format!("encrypt-decrypt-{}", short(name)), || {
                    self.encrypt_decrypt(name)
                });
                report.step(&format!("encrypt-with-public-{}", short(name)), || {
                    self.encrypt_with_public(name, kind, &public)
                });
            }
            report.step(&format!("save-public-{}", short(name)), || {
                std::fs::create_dir_all(keep).map_err(|e| format!("{}: {e}", keep.display()))?;
                let file = keep.join(format!("{name}.pub"));
                std::fs::write(&file, &public).map_err(|e| format!("{}: {e}", file.display()))?;
                Ok(file.display().to_string())
            });
        }
        if self.provider == ProviderId::Tpm {
            report.step("attestation", || self.attestation("e2e-ecc"));
        }
        report.step("destroy", || self.destroy());
        report.step("random", || {
            let bytes = self.client.psa_generate_random(32).map_err(text)?;
            if bytes.iter().all(|b| *b == 0) {
                return Err("32 zero bytes".into());
            }
            Ok(bytes)
        });
    }

    /// The keys `run` kept: listed, and still the keys whose public parts were saved.
    fn check(&mut self, report: &mut Report, keep: &Path) {
        report.step("ping", || {
            let (major, minor) = self.client.ping().map_err(text)?;
            Ok(format!("wire protocol {major}.{minor}"))
        });
        report.step("list-kept-keys", || {
            let keys = self.client.list_keys().map_err(text)?;
            let mut missing = Vec::new();
            for (name, _) in KEPT {
                if !keys
                    .iter()
                    .any(|k| k.name == name && k.provider_id == self.provider)
                {
                    missing.push(name);
                }
            }
            if missing.is_empty() {
                Ok(format!("{} keys listed", keys.len()))
            } else {
                Err(format!("not listed on {:?}: {missing:?}", self.provider))
            }
        });
        for (name, kind) in KEPT {
            let Some(saved) = report.step(&format!("saved-public-{}", short(name)), || {
                let file = keep.join(format!("{name}.pub"));
                let saved = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
                let now = self.client.psa_export_public_key(name).map_err(text)?;
                if now != saved {
                    return Err(format!(
                        "{name} exports another public key than {}",
                        file.display()
                    ));
                }
                Ok(saved)
            }) else {
                continue;
            };
            if kind.signature().is_some() {
                report.step(&format!("still-signs-{}", short(name)), || {
                    self.verify_with_public(name, kind, &saved)
                });
            } else {
                report.step(&format!("still-decrypts-{}", short(name)), || {
                    self.encrypt_with_public(name, kind, &saved)
                });
            }
        }
    }

    fn list_providers(&self) -> Result<String, String> {
        let providers = self.client.list_providers().map_err(text)?;
        let ids: Vec<ProviderId> = providers.iter().map(|p| p.id).collect();
        let core_uuid = Uuid::nil();
        if !ids.contains(&self.provider) {
            return Err(format!("{:?} is not offered: {ids:?}", self.provider));
        }
        let named: Vec<String> = providers
            .iter()
            .filter(|p| p.uuid != core_uuid)
            .map(|p| format!("{:?} ({} {})", p.id, p.vendor, p.description))
            .collect();
        Ok(named.join(", "))
    }

    /// Removes what an interrupted earlier run may have left.
    fn clean(&self) -> Result<String, String> {
        let keys = self.client.list_keys().map_err(text)?;
        let mut removed = 0;
        for key in keys {
            let ours = KEPT.iter().any(|(name, _)| *name == key.name)
                || key.name == SCRATCH
                || key.name == PUBLIC_COPY;
            if ours {
                let mut client = self.other_provider(key.provider_id)?;
                client.set_implicit_provider(key.provider_id);
                client.psa_destroy_key(&key.name).map_err(text)?;
                removed += 1;
            }
        }
        Ok(format!("{removed} keys left by an earlier run removed"))
    }

    fn sign_and_verify(&self, name: &str, alg: AsymmetricSignature) -> Result<String, String> {
        let digest = Sha256::digest(b"parsec end-to-end check").to_vec();
        let signature = self
            .client
            .psa_sign_hash(name, &digest, alg)
            .map_err(text)?;
        self.client
            .psa_verify_hash(name, &digest, alg, &signature)
            .map_err(|e| format!("its own signature does not verify: {}", text(e)))?;
        let mut other = digest.clone();
        other[0] ^= 1;
        match self.client.psa_verify_hash(name, &other, alg, &signature) {
            Err(ClientError::Service(ResponseStatus::PsaErrorInvalidSignature)) => {}
            other => return Err(format!("a wrong digest verified: {other:?}")),
        }
        Ok(format!(
            "{}-byte signature verified, a wrong digest refused",
            signature.len()
        ))
    }

    /// A signature by the provider under test, verified with the given public key by the
    /// verifier (the software provider when there is one).
    fn verify_with_public(
        &self,
        name: &str,
        kind: KeyKind,
        public: &[u8],
    ) -> Result<String, String> {
        let alg = kind.signature().ok_or("not a signing key")?;
        let digest = Sha256::digest(name.as_bytes()).to_vec();
        let signature = self
            .client
            .psa_sign_hash(name, &digest, alg)
            .map_err(text)?;
        self.with_public_copy(kind, public, |verifier| {
            verifier
                .psa_verify_hash(PUBLIC_COPY, &digest, alg, &signature)
                .map_err(|e| format!("{:?} does not verify it: {}", self.verifier, text(e)))?;
            Ok(format!(
                "signature verified by {:?} with the public key",
                self.verifier
            ))
        })
    }

    fn encrypt_decrypt(&self, name: &str) -> Result<String, String> {
        let alg = AsymmetricEncryption::RsaOaep {
            hash_alg: Hash::Sha256,
        };
        let message = b"sealed by the parsec end-to-end check";
        let ciphertext = self
            .client
            .psa_asymmetric_encrypt(name, alg, message, None)
            .map_err(text)?;
        let plaintext = self
            .client
            .psa_asymmetric_decrypt(name, alg, &ciphertext, None)
            .map_err(text)?;
        if plaintext != message {
            return Err("decrypted text differs".into());
        }
        Ok(format!("{}-byte ciphertext round trip", ciphertext.len()))
    }

    /// Encrypted with the public key by the verifier, decrypted by the provider under test.
    fn encrypt_with_public(
        &self,
        name: &str,
        kind: KeyKind,
        public: &[u8],
    ) -> Result<String, String> {
        let alg = AsymmetricEncryption::RsaOaep {
            hash_alg: Hash::Sha256,
        };
        let message = format!("for {name} only");
        let ciphertext = self.with_public_copy(kind, public, |verifier| {
            verifier
                .psa_asymmetric_encrypt(PUBLIC_COPY, alg, message.as_bytes(), None)
                .map_err(|e| format!("{:?}: {}", self.verifier, text(e)))
        })?;
        let plaintext = self
            .client
            .psa_asymmetric_decrypt(name, alg, &ciphertext, None)
            .map_err(text)?;
        if plaintext != message.as_bytes() {
            return Err("decrypted text differs".into());
        }
        Ok(format!("{:?}'s ciphertext decrypted", self.verifier))
    }

    /// Runs `f` with the public key imported into the verifier, then removes it.
    fn with_public_copy<T>(
        &self,
        kind: KeyKind,
        public: &[u8],
        f: impl FnOnce(&BasicClient) -> Result<T, String>,
    ) -> Result<T, String> {
        let verifier = self.other_provider(self.verifier)?;
        verifier
            .psa_import_key(PUBLIC_COPY, public, kind.attributes(true))
            .map_err(|e| format!("{:?} refused the public key: {}", self.verifier, text(e)))?;
        let outcome = f(&verifier);
        verifier
            .psa_destroy_key(PUBLIC_COPY)
            .map_err(|e| format!("removing the public copy: {}", text(e)))?;
        outcome
    }

    /// The attestation round trip: the verifier's challenge for the key, answered by the
    /// TPM only if the key is in it.
    fn attestation(&self, name: &str) -> Result<String, String> {
        let prepared = self
            .client
            .prepare_activate_credential(name.to_string(), None)
            .map_err(text)?;
        if !tpm_credential::name_matches_public(&prepared.name, &prepared.public) {
            return Err("the key's name is not the hash of its public area".into());
        }
        let credential = Sha256::digest(b"the verifier's nonce").to_vec();
        let challenge = tpm_credential::make_credential(
            &prepared.attesting_key_pub,
            &prepared.name,
            &credential,
        )
        .map_err(|e| format!("MakeCredential: {e:?}"))?;
        let answer = self
            .client
            .activate_credential_attestation(
                name.to_string(),
                None,
                challenge.credential_blob.clone(),
                challenge.secret.clone(),
            )
            .map_err(text)?;
        if answer != credential {
            return Err("the TPM returned another credential".into());
        }
        let mut blob = challenge.credential_blob;
        if let Some(last) = blob.last_mut() {
            *last ^= 1;
        }
        match self.client.activate_credential_attestation(
            name.to_string(),
            None,
            blob,
            challenge.secret,
        ) {
            Err(ClientError::Service(_)) => {}
            other => return Err(format!("a tampered challenge was answered: {other:?}")),
        }
        Ok("credential recovered by the TPM, a tampered one refused".to_string())
    }

    fn destroy(&self) -> Result<String, String> {
        self.client
            .psa_generate_key(SCRATCH, KeyKind::EccSign.attributes(false))
            .map_err(text)?;
        self.client.psa_destroy_key(SCRATCH).map_err(text)?;
        if self
            .client
            .list_keys()
            .map_err(text)?
            .iter()
            .any(|k| k.name == SCRATCH)
        {
            return Err("still listed after destroy".into());
        }
        match self.client.psa_export_public_key(SCRATCH) {
            Err(ClientError::Service(ResponseStatus::PsaErrorDoesNotExist)) => {}
            other => return Err(format!("a destroyed key answered: {other:?}")),
        }
        Ok("created, destroyed, gone".to_string())
    }

    /// Another client on the same service, for another provider.
    fn other_provider(&self, provider: ProviderId) -> Result<BasicClient, String> {
        let mut client = BasicClient::new_naked().map_err(text)?;
        client.set_auth_data(self.client.auth_data());
        client.set_implicit_provider(provider);
        Ok(client)
    }
}

fn short(name: &str) -> &str {
    name.trim_start_matches("e2e-")
}

fn text(error: ClientError) -> String {
    match error {
        ClientError::Service(status) => format!("service: {status:?} ({status})"),
        ClientError::Client(e) => format!("client: {e:?}"),
    }
}
