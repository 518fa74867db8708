//! The front end run in-process over a byte stream (what the fuzz target does), checked
//! against what the socket tests see.

mod common;

use common::{config_text, header, ping_frame, status_of};
use parsec_service::authenticators::PeerCredentials;
use parsec_service::config::{ConfigSource, Overrides};
use parsec_service::dispatcher::Dispatcher;
use parsec_service::front_end::answer_stream;

#[test]
fn byte_streams_in_any_pieces_get_the_socket_answers() {
    let dir = common::fresh_dir("in-process");
    let config_path = dir.join("config.toml");
    std::fs::write(
        &config_path,
        config_text(&dir.join("s.sock"), &dir.join("store"), "Direct", &[]),
    )
    .unwrap();
    let source = ConfigSource {
        path: Some(config_path),
        overrides: Overrides::default(),
        base_dir: dir.clone(),
    };
    let config = source.load().unwrap();
    let mut dispatcher = Dispatcher::new(&config).unwrap();
    let peer = Some(PeerCredentials {
        uid: 1000,
        gid: 1000,
        pid: 1,
    });

    for chunk in 1..=37 {
        let answer = answer_stream(&mut dispatcher, &ping_frame(), chunk, peer, 1 << 16);
        assert_eq!(status_of(&answer), 0, "ping in chunks of {chunk}");
    }
    let mut bad = ping_frame();
    bad[0] = 0;
    assert_eq!(
        status_of(&answer_stream(&mut dispatcher, &bad, 5, peer, 1 << 16)),
        17,
        "InvalidHeader"
    );
    let oversized = header(1, 2, 1 << 20, 1, 1);
    assert_eq!(
        status_of(&answer_stream(
            &mut dispatcher,
            &oversized,
            36,
            peer,
            1 << 16
        )),
        20,
        "BodySizeExceedsLimit"
    );
    assert!(
        answer_stream(&mut dispatcher, &ping_frame()[..30], 4, peer, 1 << 16).is_empty(),
        "half a request gets no answer"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
