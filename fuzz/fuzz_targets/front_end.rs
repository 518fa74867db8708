//! Arbitrary bytes on a client connection, through the real front end in-process:
//! connection state machine, framing and header checks, body decoding, authentication
//! (Direct), dispatch to the core and the software provider, response encoding.
//!
//! The first input byte sets how many bytes each read returns (1-64), so requests also
//! arrive in pieces. The service must neither panic nor allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parsec_service::authenticators::PeerCredentials;
use parsec_service::config::{ConfigSource, Overrides};
use parsec_service::dispatcher::Dispatcher;
use std::cell::RefCell;

/// The largest body the fuzzed service accepts: keeps each input's work bounded.
const BODY_LIMIT: usize = 64 * 1024;

/// The service's state, made once (libFuzzer runs inputs one after another on one thread).
fn new_dispatcher() -> Dispatcher {
    {
        let dir = std::env::temp_dir().join(format!("parsec-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "[core_settings]\nlog_level = \"off\"\nallow_root = true\nbody_len_limit = {BODY_LIMIT}\n\
             buffer_size_limit = 65536\n\
             [listener]\nlistener_type = \"DomainSocket\"\ntimeout = 200\nsocket_path = \"{0}/s.sock\"\n\
             [authenticator]\nauth_type = \"Direct\"\nadmins = [ {{ name = \"fuzz-admin\" }} ]\n\
             [[key_manager]]\nname = \"m\"\nmanager_type = \"OnDisk\"\nstore_path = \"{0}/store\"\n\
             [[provider]]\nprovider_type = \"MbedCrypto\"\nkey_info_manager = \"m\"\n",
            dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let source = ConfigSource {
            path: Some(dir.join("config.toml")),
            overrides: Overrides::default(),
            base_dir: dir.clone(),
        };
        let config = source.load().expect("fuzz config");
        Dispatcher::new(&config).expect("fuzz dispatcher")
    }
}

thread_local! {
    static DISPATCHER: RefCell<Dispatcher> = RefCell::new(new_dispatcher());
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let peer = Some(PeerCredentials { uid: 1000, gid: 1000, pid: 1 });
    DISPATCHER.with(|dispatcher| {
        let _ = parsec_service::front_end::answer_stream(
            &mut dispatcher.borrow_mut(),
            input,
            (chunk as usize % 64) + 1,
            peer,
            BODY_LIMIT,
        );
    });
});
