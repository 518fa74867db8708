//! Upstream Parsec's SQLite key store (1.4, 1.5), read as it is and never written.
//!
//! Upstream keeps one table, created as
//!
//! ```text
//! key_mapping(authenticator_id INTEGER, application_name TEXT, key_name TEXT,
//!             provider_uuid TEXT, provider_name TEXT, key_id BLOB, key_id_version INTEGER,
//!             key_attributes BLOB, key_attributes_version INTEGER)
//! ```
//!
//! (and `kim_metadata(id TEXT, int_value INTEGER)` with its schema version, 1). This module
//! reads that table straight from the database file, read-only, following the documented
//! SQLite file format (<https://www.sqlite.org/fileformat2.html>): the header, the schema
//! table on page 1, and the table's b-tree, its leaves and overflow pages. No SQLite library
//! is linked for it (a few hundred lines where a C library would add a dependency to every
//! build system we ship); the database is never opened for writing, so nothing here can
//! change upstream's file. A database this reader cannot take as it is, an unfinished
//! transaction (a hot rollback journal) or a write-ahead log with frames in it, is refused
//! with what to do, never half read.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

/// One row of upstream's `key_mapping`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub authenticator_id: i64,
    pub application_name: String,
    pub key_name: String,
    pub provider_uuid: String,
    pub key_id: Vec<u8>,
    pub key_id_version: i64,
    pub key_attributes: Vec<u8>,
    pub key_attributes_version: i64,
}

const COLUMNS: [&str; 9] = [
    "authenticator_id",
    "application_name",
    "key_name",
    "provider_uuid",
    "provider_name",
    "key_id",
    "key_id_version",
    "key_attributes",
    "key_attributes_version",
];

/// Whether `path` is an SQLite database file (by its header).
pub fn is_sqlite_file(path: &Path) -> bool {
    let mut magic = [0u8; 16];
    fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == b"SQLite format 3\0")
}

/// Every row of `key_mapping` in the database at `path`.
pub fn read_key_mapping(path: &Path) -> Result<Vec<Row>, String> {
    refuse_unfinished(path)?;
    let bytes = fs::read(path).map_err(|e| format!("unreadable: {e}"))?;
    key_mapping_in(&bytes)
}

/// Every row of `key_mapping` in a database file's bytes (for the fuzzer too: any bytes give
/// rows or a reason, never a panic).
pub fn key_mapping_in(bytes: &[u8]) -> Result<Vec<Row>, String> {
    let db = Database::new(bytes)?;
    let schema = db.table_rows(1)?;
    let mut root = None;
    for record in &schema {
        // sqlite_schema(type, name, tbl_name, rootpage, sql)
        if let [Value::Text(kind), Value::Text(name), _, Value::Int(page), Value::Text(sql)] =
            record.as_slice()
        {
            if kind == "table" && name == "key_mapping" {
                root = Some((*page, sql.clone()));
            }
        }
    }
    let (root, sql) = root.ok_or("it has no key_mapping table: not upstream Parsec's store")?;
    let columns = column_names(&sql);
    if columns != COLUMNS {
        return Err(format!(
            "its key_mapping table has the columns {columns:?}, not those of upstream Parsec 1.4/1.5"
        ));
    }
    let root = u32::try_from(root).map_err(|_| "a bad root page in its schema")?;
    let mut rows = Vec::new();
    for record in db.table_rows(root)? {
        let row = match record.as_slice() {
            [Value::Int(auth), Value::Text(app), Value::Text(name), Value::Text(uuid), Value::Text(_), Value::Blob(id), Value::Int(id_version), Value::Blob(attributes), Value::Int(attributes_version)] => {
                Row {
                    authenticator_id: *auth,
                    application_name: app.clone(),
                    key_name: name.clone(),
                    provider_uuid: uuid.clone(),
                    key_id: id.clone(),
                    key_id_version: *id_version,
                    key_attributes: attributes.clone(),
                    key_attributes_version: *attributes_version,
                }
            }
            other => {
                return Err(format!(
                    "a key_mapping row of another shape than upstream writes ({} values)",
                    other.len()
                ))
            }
        };
        rows.push(row);
    }
    Ok(rows)
}

/// Refuses a database whose last write did not finish: a hot rollback journal (upstream
/// rolls it back when it next opens the file) or a write-ahead log holding frames.
fn refuse_unfinished(path: &Path) -> Result<(), String> {
    let with = |suffix: &str| {
        let mut name = path.as_os_str().to_os_string();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    let journal = with("-journal");
    if let Ok(bytes) = fs::read(&journal) {
        if bytes.len() >= 8 && bytes[..8] == [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7] {
            return Err(format!(
                "{} holds a transaction that did not finish: start upstream Parsec once (it rolls the transaction back), or run `sqlite3 {} 'PRAGMA integrity_check'`, which does; then start this service",
                journal.display(),
                path.display()
            ));
        }
    }
    let wal = with("-wal");
    if fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        return Err(format!(
            "{} holds changes not yet in the database file: run `sqlite3 {} 'PRAGMA wal_checkpoint(TRUNCATE)'` (or start upstream Parsec once), then start this service",
            wal.display(),
            path.display()
        ));
    }
    Ok(())
}

/// The column names of a `CREATE TABLE name (...)` statement, in order (table constraints
/// such as `PRIMARY KEY (...)` left out).
fn column_names(sql: &str) -> Vec<String> {
    let Some(body) = sql
        .find('(')
        .and_then(|open| Some(&sql[open + 1..sql.rfind(')')?]))
    else {
        return Vec::new();
    };
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in body.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
        .iter()
        .filter_map(|part| {
            let word = part.split_whitespace().next()?;
            let word = word.trim_matches(|c| c == '`' || c == '"' || c == '[' || c == ']');
            let upper = word.to_ascii_uppercase();
            (!["PRIMARY", "UNIQUE", "CHECK", "FOREIGN", "CONSTRAINT"].contains(&upper.as_str()))
                .then(|| word.to_string())
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Int(i64),
    Real,
    Text(String),
    Blob(Vec<u8>),
}

struct Database<'a> {
    bytes: &'a [u8],
    page_size: usize,
    /// Usable bytes per page (page size less the reserved space at each page's end).
    usable: usize,
    pages: u32,
}

impl<'a> Database<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, String> {
        if bytes.len() < 100 || &bytes[..16] != b"SQLite format 3\0" {
            return Err("not an SQLite database".into());
        }
        let page_size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
            1 => 65536,
            n if n >= 512 && n.is_power_of_two() => n as usize,
            n => return Err(format!("an SQLite page size of {n}")),
        };
        let reserved = bytes[20] as usize;
        if page_size - reserved < 480 {
            return Err("an SQLite header with too much reserved space".into());
        }
        if u32::from_be_bytes(bytes[56..60].try_into().expect("4 bytes")) > 1 {
            return Err(
                "a UTF-16 SQLite database: upstream Parsec writes UTF-8, so this is not its store"
                    .into(),
            );
        }
        let pages = u32::try_from(bytes.len() / page_size).unwrap_or(u32::MAX);
        Ok(Database {
            bytes,
            page_size,
            usable: page_size - reserved,
            pages,
        })
    }

    fn page(&self, number: u32) -> Result<&'a [u8], String> {
        if number == 0 || number > self.pages {
            return Err(format!("a reference to page {number} of {}", self.pages));
        }
        let start = (number as usize - 1) * self.page_size;
        Ok(&self.bytes[start..start + self.usable])
    }

    /// Every record of the table whose b-tree starts at `root`, in rowid order.
    fn table_rows(&self, root: u32) -> Result<Vec<Vec<Value>>, String> {
        let mut rows = Vec::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![root];
        while let Some(number) = stack.pop() {
            if !seen.insert(number) {
                return Err(format!("page {number} is reached twice: a damaged b-tree"));
            }
            let page = self.page(number)?;
            let at = if number == 1 { 100 } else { 0 };
            let header = page.get(at..at + 12).ok_or("a truncated page")?;
            let cells = u16::from_be_bytes([header[3], header[4]]) as usize;
            let (interior, header_len) = match header[0] {
                0x05 => (true, 12),
                0x0d => (false, 8),
                kind => return Err(format!("page {number} is of type {kind:#x}, not a table's")),
            };
            let pointers = page
                .get(at + header_len..at + header_len + 2 * cells)
                .ok_or("a truncated cell pointer array")?;
            let offsets = pointers
                .chunks(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]) as usize);
            if interior {
                // Children in key order: pushed reversed, as the stack pops the last first.
                let mut children: Vec<u32> = Vec::with_capacity(cells + 1);
                for offset in offsets {
                    let child = page.get(offset..offset + 4).ok_or("a cell past its page")?;
                    children.push(u32::from_be_bytes(child.try_into().expect("4 bytes")));
                }
                children.push(u32::from_be_bytes(
                    header[8..12].try_into().expect("4 bytes"),
                ));
                stack.extend(children.into_iter().rev());
            } else {
                for offset in offsets {
                    let payload = self.leaf_payload(page, offset, &mut seen)?;
                    rows.push(record(&payload)?);
                }
            }
        }
        Ok(rows)
    }

    /// The whole payload of a table leaf cell, following its overflow pages.
    fn leaf_payload(
        &self,
        page: &[u8],
        offset: usize,
        seen: &mut BTreeSet<u32>,
    ) -> Result<Vec<u8>, String> {
        let cell = page.get(offset..).ok_or("a cell past its page")?;
        let (size, n) = varint(cell)?;
        let (_rowid, m) = varint(&cell[n..])?;
        let size = usize::try_from(size).map_err(|_| "a huge payload")?;
        if size > self.bytes.len() {
            return Err("a payload larger than the database".into());
        }
        let start = n + m;
        let u = self.usable;
        let max_local = u - 35;
        let local = if size <= max_local {
            size
        } else {
            let min_local = (u - 12) * 32 / 255 - 23;
            let k = min_local + (size - min_local) % (u - 4);
            if k <= max_local {
                k
            } else {
                min_local
            }
        };
        let mut payload = cell
            .get(start..start + local)
            .ok_or("a cell past its page")?
            .to_vec();
        if local < size {
            let next = cell
                .get(start + local..start + local + 4)
                .ok_or("a cell past its page")?;
            let mut next = u32::from_be_bytes(next.try_into().expect("4 bytes"));
            while payload.len() < size {
                if !seen.insert(next) {
                    return Err(format!("overflow page {next} is reached twice"));
                }
                let overflow = self.page(next)?;
                let take = (size - payload.len()).min(u - 4);
                payload.extend_from_slice(&overflow[4..4 + take]);
                next = u32::from_be_bytes(overflow[..4].try_into().expect("4 bytes"));
            }
        }
        Ok(payload)
    }
}

/// A record: its header (serial types), then the values.
fn record(payload: &[u8]) -> Result<Vec<Value>, String> {
    let (header_len, mut at) = varint(payload)?;
    let header_len = usize::try_from(header_len).map_err(|_| "a huge record header")?;
    let header = payload
        .get(..header_len)
        .ok_or("a truncated record header")?;
    let mut body = header_len;
    let mut values = Vec::new();
    while at < header_len {
        let (serial, n) = varint(&header[at..])?;
        at += n;
        let (len, value): (usize, fn(&[u8]) -> Value) = match serial {
            0 => (0, |_| Value::Null),
            1..=6 => ([1, 2, 3, 4, 6, 8][serial as usize - 1], |b: &[u8]| {
                let mut v = if b[0] & 0x80 != 0 { -1i64 } else { 0 };
                for &byte in b {
                    v = (v << 8) | byte as i64;
                }
                Value::Int(v)
            }),
            7 => (8, |_| Value::Real),
            8 => (0, |_| Value::Int(0)),
            9 => (0, |_| Value::Int(1)),
            n if n >= 12 && n % 2 == 0 => (((n - 12) / 2) as usize, |b| Value::Blob(b.to_vec())),
            n if n >= 13 => (((n - 13) / 2) as usize, |b| {
                String::from_utf8(b.to_vec()).map_or(Value::Null, Value::Text)
            }),
            n => return Err(format!("a record with serial type {n}")),
        };
        let bytes = payload
            .get(body..body + len)
            .ok_or("a record shorter than its header says")?;
        values.push(value(bytes));
        body += len;
    }
    Ok(values)
}

/// SQLite's variable-length integer: 1 to 9 bytes, big-endian, 7 bits per byte with the
/// high bit set on all but the last (the ninth byte gives all 8 bits).
fn varint(bytes: &[u8]) -> Result<(u64, usize), String> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(9) {
        if i == 8 {
            return Ok(((value << 8) | byte as u64, 9));
        }
        value = (value << 7) | (byte & 0x7f) as u64;
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err("a truncated varint".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_decode() {
        assert_eq!(varint(&[0x05]).unwrap(), (5, 1));
        assert_eq!(varint(&[0x81, 0x00]).unwrap(), (128, 2));
        assert_eq!(varint(&[0xff; 9]).unwrap(), (u64::MAX, 9));
        assert!(varint(&[0x80]).is_err());
    }

    #[test]
    fn upstreams_create_statement_gives_its_columns() {
        let sql = "CREATE TABLE key_mapping (
                        authenticator_id            INTEGER NOT NULL,
                        application_name            TEXT NOT NULL,
                        key_name                    TEXT NOT NULL,
                        provider_uuid               TEXT NOT NULL,
                        provider_name               TEXT NOT NULL,
                        key_id                      BLOB NOT NULL,
                        key_id_version              INTEGER NOT NULL,
                        key_attributes              BLOB NOT NULL,
                        key_attributes_version      INTEGER NOT NULL,
                        PRIMARY KEY (authenticator_id, application_name, key_name)
                    )";
        assert_eq!(column_names(sql), COLUMNS);
    }

    #[test]
    fn damaged_databases_are_refused_not_panicked_on() {
        assert!(Database::new(b"not a database").is_err());
        let mut bytes = b"SQLite format 3\0".to_vec();
        bytes.resize(1024, 0);
        bytes[16..18].copy_from_slice(&1024u16.to_be_bytes());
        // Page 1 of type 0: not a table b-tree.
        assert!(Database::new(&bytes).unwrap().table_rows(1).is_err());
        bytes[100] = 0x0d;
        bytes[103..105].copy_from_slice(&400u16.to_be_bytes()); // 400 cells in 1 KiB
        assert!(Database::new(&bytes).unwrap().table_rows(1).is_err());
        bytes[100] = 0x05;
        bytes[103..105].copy_from_slice(&0u16.to_be_bytes());
        bytes[108..112].copy_from_slice(&1u32.to_be_bytes()); // its own child
        assert!(Database::new(&bytes).unwrap().table_rows(1).is_err());
        assert!(record(&[0x03, 0x0a, 0x01]).is_err());
        assert!(record(&[0x02, 0x1f]).is_err());
    }
}

/// The reader against databases the real SQLite writes (Python's sqlite3 module): small
/// pages so that the table spans interior pages, payloads that spill into overflow pages,
/// a rollback journal left behind. Skipped, saying so, where python3 has no sqlite3.
#[cfg(test)]
mod real_sqlite {
    use super::*;
    use std::process::Command;

    const UPSTREAM_SCHEMA: &str = "CREATE TABLE kim_metadata (id TEXT NOT NULL, int_value INTEGER NOT NULL, PRIMARY KEY (id)); INSERT INTO kim_metadata VALUES ('schema_version', 1); CREATE TABLE key_mapping (authenticator_id INTEGER NOT NULL, application_name TEXT NOT NULL, key_name TEXT NOT NULL, provider_uuid TEXT NOT NULL, provider_name TEXT NOT NULL, key_id BLOB NOT NULL, key_id_version INTEGER NOT NULL, key_attributes BLOB NOT NULL, key_attributes_version INTEGER NOT NULL, PRIMARY KEY (authenticator_id, application_name, key_name));";

    fn python(script: &str) -> bool {
        match Command::new("python3").args(["-c", script]).status() {
            Ok(status) => {
                assert!(status.success(), "python3 failed on:\n{script}");
                true
            }
            Err(e) => {
                eprintln!("SKIPPED: python3 cannot run here ({e})");
                false
            }
        }
    }

    /// An empty scratch directory, and where its database goes.
    fn scratch(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("sqlite-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let db = dir.join("kim.sqlite3");
        (dir, db)
    }

    #[test]
    fn rows_across_interior_and_overflow_pages_read_as_sqlite_wrote_them() {
        let (dir, db) = scratch("rows");
        // 600 rows in 512-byte pages: three b-tree levels; every 50th key id is 3000 bytes
        // (overflow chains); names in UTF-8 beyond ASCII; authenticators 1 and 3.
        let script = format!(
            r#"
import sqlite3
c = sqlite3.connect({db:?})
c.execute("PRAGMA page_size = 512")
c.executescript({UPSTREAM_SCHEMA:?})
for i in range(600):
    key_id = bytes([i % 256]) * (3000 if i % 50 == 0 else 4)
    c.execute("INSERT INTO key_mapping VALUES (?, ?, ?, ?, ?, ?, 1, ?, 1)",
        (1 if i % 2 else 3, "app-é-%d" % (i % 7), "key-%d" % i,
         "1c1139dc-ad7c-47dc-ad6b-db6fdb466552", "mbed-crypto-provider",
         key_id, bytes(range(i % 200))))
c.commit()
"#,
            db = db.display().to_string()
        );
        if !python(&script) {
            return;
        }
        let rows = read_key_mapping(&db).unwrap();
        assert_eq!(rows.len(), 600);
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row.key_name, format!("key-{i}"));
            assert_eq!(row.application_name, format!("app-é-{}", i % 7));
            assert_eq!(row.authenticator_id, if i % 2 == 1 { 1 } else { 3 });
            let len = if i % 50 == 0 { 3000 } else { 4 };
            assert_eq!(row.key_id, vec![(i % 256) as u8; len], "row {i}");
            assert_eq!(row.key_attributes, (0..(i % 200) as u8).collect::<Vec<_>>());
            assert_eq!((row.key_id_version, row.key_attributes_version), (1, 1));
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unfinished_transaction_is_refused() {
        let (dir, db) = scratch("hot");
        // A process killed in the middle of a transaction leaves its hot journal behind:
        // os._exit skips SQLite's clean-up as kill -9 would.
        let script = format!(
            r#"
import os, sqlite3
c = sqlite3.connect({db:?})
c.executescript({UPSTREAM_SCHEMA:?})
c.execute("PRAGMA cache_size = 1")
c.execute("BEGIN")
for i in range(300):
    c.execute("INSERT INTO key_mapping VALUES (1, 'a', ?, 'u', 'p', x'01', 1, x'02', 1)", ("k%d" % i,))
os._exit(0)
"#,
            db = db.display().to_string()
        );
        if !python(&script) {
            return;
        }
        let journal = dir.join("kim.sqlite3-journal");
        assert!(journal.exists(), "the killed writer left its journal");
        let err = read_key_mapping(&db).unwrap_err();
        assert!(err.contains("did not finish"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
