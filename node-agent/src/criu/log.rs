//! Quoting the useful part of a CRIU log in an error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

/// At most this many lines are quoted.
pub const MAX_EXCERPT_LINES: usize = 20;
/// Lines of context quoted before / after each matching line.
const CONTEXT_BEFORE: usize = 2;
const CONTEXT_AFTER: usize = 1;
/// Only the tail of a huge log is read: CRIU stops at its first error, so
/// the errors are near the end.
const MAX_READ: u64 = 8 << 20;

/// The path of `file` inside the directory `dir` (for messages only).
pub fn path_in_dir(dir: BorrowedFd<'_>, file: &str) -> PathBuf {
    let dir_path = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .unwrap_or_else(|_| PathBuf::from(format!("<fd {}>", dir.as_raw_fd())));
    dir_path.join(file)
}

/// Reads `file` (relative to the directory `dir`) and returns its relevant
/// lines; a note instead when the log cannot be read.
pub fn excerpt_from_dir(dir: BorrowedFd<'_>, file: &str) -> Vec<String> {
    match read_tail(dir, file) {
        Ok(text) => excerpt(&text),
        Err(e) => vec![format!("(cannot read the log: {e})")],
    }
}

fn read_tail(dir: BorrowedFd<'_>, file: &str) -> std::io::Result<String> {
    let raw = openat(
        Some(dir.as_raw_fd()),
        file,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )?;
    // SAFETY: `openat` just returned this descriptor; nothing else owns it.
    let mut f = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let len = f.metadata()?.len();
    if len > MAX_READ {
        f.seek(SeekFrom::Start(len - MAX_READ))?;
    }
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// CRIU error lines that do not explain a failure: CRIU logs them (and may
/// return them as `cr_errmsg`) on every run in a container without
/// CAP_SYS_RESOURCE, successful or not.
const BENIGN: &[&str] = &["Can't setup RLIMIT_NOFILE"];

/// Whether an error line is one of the known harmless ones.
pub fn is_benign(line: &str) -> bool {
    BENIGN.iter().any(|b| line.contains(b))
}

/// The first line of CRIU's own error format (`Error (file:line): ...`)
/// that is not known to be harmless, without its timestamp.
pub fn first_real_error(lines: &[String]) -> Option<String> {
    lines
        .iter()
        .filter(|l| !is_benign(l))
        .find_map(|l| l.find("Error (").map(|i| l[i..].to_string()))
}

fn is_error_line(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    lower.contains("error")
        || lower.contains("can't")
        || lower.contains("fail")
        || lower.contains("unable")
        || line.contains("Warn ")
}

/// The lines of `text` that explain a failure: lines mentioning an error
/// ("Error", "error", "Can't", "fail", "unable", "Warn") with a little context, at most
/// [`MAX_EXCERPT_LINES`]. Matches long before CRIU's first real error line
/// (`Error (file:line):`) are debug noise and are skipped.
pub fn excerpt(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let first_real = lines
        .iter()
        .position(|l| l.contains("Error (") && !is_benign(l));
    let floor = first_real.map_or(0, |i| i.saturating_sub(10));

    // Merge the context windows of all matches into sorted, disjoint ranges.
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for (i, line) in lines.iter().enumerate().skip(floor) {
        if !is_error_line(line) || is_benign(line) {
            continue;
        }
        let start = i.saturating_sub(CONTEXT_BEFORE).max(floor);
        let end = (i + CONTEXT_AFTER + 1).min(lines.len());
        match ranges.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => ranges.push((start, end)),
        }
    }

    let mut out = Vec::new();
    for (n, (start, end)) in ranges.iter().enumerate() {
        if n > 0 {
            out.push("...".to_string());
        }
        for line in &lines[*start..*end] {
            if out.len() >= MAX_EXCERPT_LINES {
                out.push("... (more in the log)".to_string());
                return out;
            }
            out.push(line.trim_end().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_error_lines_with_context() {
        let log = "a\nb\nc\n(0.1) Error (criu/cr-dump.c:1): Can't do it\nd\ne\nf\n";
        let ex = excerpt(log);
        assert_eq!(
            ex,
            vec!["b", "c", "(0.1) Error (criu/cr-dump.c:1): Can't do it", "d"]
        );
    }

    #[test]
    fn skips_noise_far_before_the_first_error_and_caps() {
        let mut log = String::from("early fail noise\n");
        for i in 0..30 {
            log.push_str(&format!("line {i}\n"));
        }
        for i in 0..40 {
            log.push_str(&format!("Error (x.c:{i}): Can't\n"));
        }
        let ex = excerpt(&log);
        assert!(!ex.iter().any(|l| l.contains("noise")));
        assert_eq!(ex.len(), MAX_EXCERPT_LINES + 1);
        assert!(ex[MAX_EXCERPT_LINES].starts_with("..."));
    }

    #[test]
    fn benign_errors_are_not_the_cause() {
        let log = "Error (util.c:1): rlimit: Can't setup RLIMIT_NOFILE for self\nx\nx\nx\nx\nx\n\
                   (0.2) Error (seize.c:9): Can't seize\n";
        let ex = excerpt(log);
        assert!(!ex.iter().any(|l| l.contains("RLIMIT")), "{ex:?}");
        assert_eq!(
            first_real_error(&ex).as_deref(),
            Some("Error (seize.c:9): Can't seize")
        );
    }

    #[test]
    fn nothing_to_quote() {
        assert!(excerpt("all good\nfine\n").is_empty());
    }
}
