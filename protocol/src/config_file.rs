//! What ckpt's TOML config files (`ckpt.toml`, `coordinator.toml`,
//! `agent.toml`) share: errors that name the file, the key and the line,
//! durations written as `"10s"`, and node names.
//!
//! The parsers themselves live with the programs they configure; this
//! module has no TOML parser of its own, so it takes the parser's message
//! and byte span.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Why a config file could not be used. The message of
/// [`ConfigError::Invalid`] names the key and the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Reads `path` and hands its text to `parse`, whose error message
/// (naming the key and line) is wrapped with the file name.
pub fn load<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigError::Invalid {
        path: path.into(),
        message,
    })
}

/// A parser error as ``line L, key `K`: message (in `the line`)``: the
/// span gives the line, the line gives the key (dotted with its table).
pub fn describe(text: &str, message: &str, span: Option<Range<usize>>) -> String {
    let msg = message.trim();
    let Some(span) = span else {
        return msg.to_owned();
    };
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
    match key_on_line(text, line) {
        Some(key) => format!("line {line}, key `{key}`: {msg} (in `{snippet}`)"),
        None => format!("line {line}: {msg} (in `{snippet}`)"),
    }
}

/// The key set on `line` (1-based), with the table it is in.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let (key, _) = lines.get(line - 1)?.split_once('=')?;
    let key = key.trim();
    let bare = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !bare(key) {
        return None;
    }
    let table = lines[..line - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .and_then(|h| h.strip_prefix('[')?.strip_suffix(']'))
        .filter(|t| bare(t));
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

/// The line (1-based) where `key` is set. `key` may be dotted
/// (`deadlines.prepare`): the leaf is looked for in that table's section.
/// A top-level key is only looked for before the first table header.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let (table, leaf) = match key.rsplit_once('.') {
        Some((t, l)) => (Some(t), l),
        None => (None, key),
    };
    let lines: Vec<&str> = text.lines().collect();
    let is_header = |l: &str| l.trim_start().starts_with('[');
    let start = match table {
        None => 0,
        Some(t) => {
            let header = format!("[{t}]");
            lines.iter().position(|l| l.trim() == header)? + 1
        }
    };
    lines[start..]
        .iter()
        .take_while(|l| !is_header(l))
        .position(|l| {
            l.trim_start()
                .strip_prefix(leaf)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| start + i + 1)
}

/// "key `K` at line L" (or just "key `K`" when it is not in the text, i.e.
/// a default is wrong), for validation errors.
pub fn at(text: &str, key: &str) -> String {
    match line_of(text, key) {
        Some(n) => format!("key `{key}` at line {n}"),
        None => format!("key `{key}`"),
    }
}

/// Deserializes a duration written for humans: `"10s"`, `"500ms"`,
/// `"2m 30s"`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

/// A node name as the handshake accepts it: letters, digits, `-`, `_`,
/// `.`; not empty, not `.`/`..`, at most [`crate::auth::MAX_NAME_LEN`]
/// bytes.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= crate::auth::MAX_NAME_LEN
        && !name.contains("..")
        && name != "."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node name {name:?} may only hold letters, digits, '-', '_' and '.' (at most {} bytes, \
             not '.' or containing '..')",
            crate::auth::MAX_NAME_LEN
        ))
    }
}

/// Checks that each `(key, path)` is absolute.
pub fn check_absolute(text: &str, paths: &[(&str, &Path)]) -> Result<(), String> {
    for (key, p) in paths {
        if !p.is_absolute() {
            return Err(format!(
                "{}: {} must be an absolute path",
                at(text, key),
                p.display()
            ));
        }
    }
    Ok(())
}

/// Checks that each `(key, duration)` is not zero.
pub fn check_positive(text: &str, durations: &[(&str, Duration)]) -> Result<(), String> {
    for (key, d) in durations {
        if d.is_zero() {
            return Err(format!("{}: {key} must be positive", at(text, key)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "a = 1\n# b = 0\nb = 2\n\n[t]\na = 3\nc = 4\n[u]\nc = 5\n";

    #[test]
    fn line_of_finds_top_level_and_table_keys() {
        assert_eq!(line_of(TEXT, "a"), Some(1));
        assert_eq!(line_of(TEXT, "b"), Some(3));
        assert_eq!(line_of(TEXT, "c"), None);
        assert_eq!(line_of(TEXT, "t.a"), Some(6));
        assert_eq!(line_of(TEXT, "t.c"), Some(7));
        assert_eq!(line_of(TEXT, "u.c"), Some(9));
        assert_eq!(line_of(TEXT, "v.c"), None);
        assert_eq!(line_of("ab = 1\na = 2\n", "a"), Some(2));
    }

    #[test]
    fn at_and_describe_name_the_line() {
        assert_eq!(at(TEXT, "t.c"), "key `t.c` at line 7");
        assert_eq!(at(TEXT, "zz"), "key `zz`");
        let start = TEXT.find("c = 4").unwrap();
        assert_eq!(
            describe(TEXT, " bad ", Some(start..start + 1)),
            "line 7, key `t.c`: bad (in `c = 4`)"
        );
        let start = TEXT.find("b = 2").unwrap();
        assert_eq!(
            describe(TEXT, "bad", Some(start..start)),
            "line 3, key `b`: bad (in `b = 2`)"
        );
        let start = TEXT.find("[u]").unwrap();
        assert_eq!(
            describe(TEXT, "bad", Some(start..start)),
            "line 8: bad (in `[u]`)"
        );
        assert_eq!(describe(TEXT, "bad", None), "bad");
    }

    #[test]
    fn node_names() {
        for ok in ["n1", "node-01.cluster", "a_b"] {
            check_node_name(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "a..b", &"x".repeat(256)] {
            assert!(check_node_name(bad).is_err(), "{bad:?}");
        }
    }
}
