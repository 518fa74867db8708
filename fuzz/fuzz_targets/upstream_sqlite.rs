//! The reader of upstream Parsec's SQLite key store on any bytes: a database file is read
//! straight from its pages (key_store/sqlite.rs), so a damaged or hostile one must give rows
//! or a reason, never a panic, a hang or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parsec_service::key_store::sqlite::key_mapping_in;

fuzz_target!(|data: &[u8]| {
    let _ = key_mapping_in(data);
});
