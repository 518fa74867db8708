//! The power-cut test's guest side (qemu-tests/run.sh --power-cuts N):
//!
//! - `inventory`: every key of this application whose name starts with `pc-`, on every
//!   provider: its public key and whether it still signs (verified with its public key by
//!   the service), one line each: `PARSEC-CUT have PROVIDER NAME PUBHEX sign=ok|fail`, then
//!   `PARSEC-CUT inventory-done count=N`.
//! - `churn`: creates, signs with and destroys keys on the software and TPM providers until
//!   the machine loses power, in `THREADS` concurrent clients (so that the software
//!   provider's batches and the key store's group commits carry several changes at once),
//!   each destroying its oldest keys (earlier boots' too) to keep about ten each; it prints
//!   `PARSEC-CUT churn-started threads=N`, then `PARSEC-CUT begin create|destroy PROVIDER
//!   NAME` before each change and `PARSEC-CUT ack create PROVIDER NAME PUBHEX` / `PARSEC-CUT
//!   ack destroy PROVIDER NAME` once the service has answered it. Thread T names its keys
//!   `pc-BOOT-tT-I`, I counting up. The host checks, boot after boot, that every
//!   acknowledged key is there with its public key and every acknowledged destroy held.

use super::KeyKind;
use parsec_client::core::interface::operations::psa_algorithm::AsymmetricSignature;
use parsec_client::core::interface::operations::psa_key_attributes::Attributes;
use parsec_client::core::interface::requests::ProviderId;
use parsec_client::BasicClient;
use std::io::Write;
use std::process::ExitCode;

const PREFIX: &str = "pc-";

fn ecdsa() -> AsymmetricSignature {
    KeyKind::EccSign.signature().expect("ECDSA signs")
}

fn p256() -> Attributes {
    KeyKind::EccSign.attributes(false)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn label(provider: ProviderId) -> &'static str {
    match provider {
        ProviderId::Tpm => "tpm",
        ProviderId::Pkcs11 => "pkcs11",
        _ => "mbed-crypto",
    }
}

/// One line, flushed at once: the console is all the host has after a power cut.
fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn client(provider: ProviderId) -> Result<BasicClient, String> {
    let mut client =
        BasicClient::new(Some("parsec-e2e".to_string())).map_err(|e| format!("{e:?}"))?;
    client.set_implicit_provider(provider);
    Ok(client)
}

/// The providers the churn runs on: the software and TPM providers the service offers.
fn providers() -> Result<Vec<ProviderId>, String> {
    let offered = client(ProviderId::Core)?
        .list_providers()
        .map_err(|e| format!("{e:?}"))?;
    Ok([ProviderId::MbedCrypto, ProviderId::Tpm]
        .into_iter()
        .filter(|p| offered.iter().any(|o| o.id == *p))
        .collect())
}

pub fn inventory() -> ExitCode {
    let result = (|| -> Result<usize, String> {
        let mut count = 0;
        for provider in providers()? {
            let client = client(provider)?;
            let keys = client.list_keys().map_err(|e| format!("{e:?}"))?;
            for key in keys
                .iter()
                .filter(|k| k.provider_id == provider && k.name.starts_with(PREFIX))
            {
                let public = client.psa_export_public_key(&key.name);
                let signs = client
                    .psa_sign_hash(&key.name, &[0x5c; 32], ecdsa())
                    .and_then(|sig| client.psa_verify_hash(&key.name, &[0x5c; 32], ecdsa(), &sig))
                    .is_ok();
                say(format!(
                    "PARSEC-CUT have {} {} {} sign={}",
                    label(provider),
                    key.name,
                    public.map(|p| hex(&p)).unwrap_or_else(|_| "none".into()),
                    if signs { "ok" } else { "fail" }
                ));
                count += 1;
            }
        }
        Ok(count)
    })();
    match result {
        Ok(count) => {
            say(format!("PARSEC-CUT inventory-done count={count}"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(format!("PARSEC-CUT inventory-failed {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Concurrent clients in the churn.
const THREADS: usize = 3;

pub fn churn(boot: &str) -> ExitCode {
    let providers = match providers() {
        Ok(p) if !p.is_empty() => p,
        other => {
            say(format!("PARSEC-CUT churn-failed providers {other:?}"));
            return ExitCode::FAILURE;
        }
    };
    // The keys earlier boots left are destroyed first, oldest first, shared out among the
    // threads, so that the number of keys stays level however many cuts there are.
    let mut earlier: Vec<Vec<(ProviderId, String)>> = vec![Vec::new(); THREADS];
    let mut n = 0;
    for provider in &providers {
        let Ok(keys) = client(*provider).and_then(|c| c.list_keys().map_err(|e| format!("{e:?}")))
        else {
            continue;
        };
        for key in keys
            .into_iter()
            .filter(|k| k.provider_id == *provider && k.name.starts_with(PREFIX))
        {
            earlier[n % THREADS].push((*provider, key.name));
            n += 1;
        }
    }
    say(format!("PARSEC-CUT churn-started threads={THREADS}"));
    let threads: Vec<_> = earlier
        .into_iter()
        .enumerate()
        .map(|(t, alive)| {
            let providers = providers.clone();
            let prefix = format!("{PREFIX}{boot}-t{t}-");
            std::thread::spawn(move || churn_thread(&providers, &prefix, alive))
        })
        .collect();
    let mut code = ExitCode::SUCCESS;
    for thread in threads {
        if !matches!(thread.join(), Ok(Ok(()))) {
            code = ExitCode::FAILURE;
        }
    }
    code
}

/// One client's churn (until the power goes, or a failure, which it reports).
fn churn_thread(
    providers: &[ProviderId],
    prefix: &str,
    mut alive: Vec<(ProviderId, String)>,
) -> Result<(), ()> {
    let clients: Vec<(ProviderId, BasicClient)> = providers
        .iter()
        .map(|p| client(*p).map(|c| (*p, c)))
        .collect::<Result<_, _>>()
        .map_err(|e| say(format!("PARSEC-CUT churn-failed {e}")))?;
    let client_of = |provider: ProviderId| {
        &clients
            .iter()
            .find(|(p, _)| *p == provider)
            .expect("a client per provider")
            .1
    };
    for i in 0u64.. {
        let (provider, client) = &clients[(i % clients.len() as u64) as usize];
        let name = format!("{prefix}{i}");
        say(format!(
            "PARSEC-CUT begin create {} {name}",
            label(*provider)
        ));
        let public = client
            .psa_generate_key(&name, p256())
            .and_then(|()| client.psa_export_public_key(&name))
            .map_err(|e| say(format!("PARSEC-CUT churn-failed create {name}: {e:?}")))?;
        say(format!(
            "PARSEC-CUT ack create {} {name} {}",
            label(*provider),
            hex(&public)
        ));
        alive.push((*provider, name.clone()));
        if client.psa_sign_hash(&name, &[1; 32], ecdsa()).is_err() {
            say(format!("PARSEC-CUT churn-failed sign {name}"));
            return Err(());
        }
        // Destroy the oldest key every other round, and two while there are more than ten
        // (each boot's cut leaves a key or two more: the count comes back down to ten).
        let destroys = match alive.len() {
            n if n > 11 => 2,
            n if n > 10 || (i % 2 == 1 && n > 2) => 1,
            _ => 0,
        };
        for _ in 0..destroys {
            let (owner, old) = alive.remove(0);
            say(format!("PARSEC-CUT begin destroy {} {old}", label(owner)));
            client_of(owner)
                .psa_destroy_key(&old)
                .map_err(|e| say(format!("PARSEC-CUT churn-failed destroy {old}: {e:?}")))?;
            say(format!("PARSEC-CUT ack destroy {} {old}", label(owner)));
        }
    }
    Ok(())
}
