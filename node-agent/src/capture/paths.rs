//! Pure path rules: which session dir a path falls in, and the
//! "no listed path inside another" normal form of `copy_paths`.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// `fnmatch`-style match of one path component: `*` any run, `?` one byte.
pub(crate) fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

/// The normal components of an absolute path, or `None` if it is relative or
/// holds `..` (we never guess what a `..` resolves to).
fn normal_components(path: &Path) -> Option<Vec<&std::ffi::OsStr>> {
    let mut comps = path.components();
    if comps.next() != Some(Component::RootDir) {
        return None;
    }
    let mut out = Vec::new();
    for c in comps {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// If `path` lies in (or is) a session dir under `tmp_root`, that dir.
///
/// A pattern is a `/`-separated list of component globs relative to
/// `tmp_root` (`ompi.*/pid.*`); the dir is `tmp_root` joined with the first
/// as many components of `path` as the pattern has.
pub(crate) fn session_dir_of(path: &Path, tmp_root: &Path, patterns: &[String]) -> Option<PathBuf> {
    let root = normal_components(tmp_root)?;
    let comps = normal_components(path)?;
    let rel = comps.strip_prefix(root.as_slice())?;
    patterns.iter().find_map(|pat| {
        let globs: Vec<&str> = pat.split('/').filter(|s| !s.is_empty()).collect();
        if globs.is_empty() || rel.len() < globs.len() {
            return None;
        }
        let all = globs
            .iter()
            .zip(rel)
            .all(|(g, c)| glob_match(g.as_bytes(), c.as_bytes()));
        all.then(|| {
            let mut dir = tmp_root.to_path_buf();
            dir.extend(&rel[..globs.len()]);
            dir
        })
    })
}

/// A dir a process declares as its session dir is captured whole only if
/// it is absolute, free of `..`, at least two levels deep, and neither a shm
/// root nor `tmp_root` nor above one of them: a stray `OMPI_...=/tmp` must
/// not pull in the whole of `/tmp`.
pub(crate) fn plausible_session_dir(dir: &Path, rules: &super::CaptureRules) -> bool {
    let Some(comps) = normal_components(dir) else {
        return false;
    };
    comps.len() >= 2
        && !rules
            .shm_roots
            .iter()
            .chain(std::iter::once(&rules.tmp_root))
            .any(|r| r.starts_with(dir))
}

/// `path` is strictly inside `dir` (component-wise).
pub(crate) fn strictly_under(path: &Path, dir: &Path) -> bool {
    path != dir && path.starts_with(dir)
}

/// Sorts, dedups, and drops every path that lies inside another listed one.
pub(crate) fn normalize(mut paths: Vec<PathBuf>) -> Vec<PathBuf> {
    // Path ordering is component-wise, so everything inside X sorts right
    // after X: comparing with the last kept entry is enough.
    paths.sort();
    paths.dedup();
    let mut out: Vec<PathBuf> = Vec::with_capacity(paths.len());
    for p in paths {
        if out.last().is_some_and(|last| p.starts_with(last)) {
            continue;
        }
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(b"ompi.*", b"ompi.vm.0"));
        assert!(glob_match(b"pid.*", b"pid.16588"));
        assert!(!glob_match(b"pid.*", b"jf.1"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a*b*c", b"axxbyyc"));
        assert!(!glob_match(b"a*b*c", b"axxbyy"));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(!glob_match(b"ompi.*", b"xompi.vm"));
    }

    #[test]
    fn session_dirs() {
        let pats = vec!["ompi.*/pid.*".to_string(), "ompi.*/jf.*".to_string()];
        let t = Path::new("/tmp");
        let d = |p: &str| session_dir_of(Path::new(p), t, &pats);
        let want = Some(PathBuf::from("/tmp/ompi.vm.0/pid.16588"));
        assert_eq!(
            d("/tmp/ompi.vm.0/pid.16588/pmix_dstor_ds21_16588/smseg-1-0"),
            want
        );
        assert_eq!(d("/tmp/ompi.vm.0/pid.16588"), want);
        assert_eq!(d("/tmp//ompi.vm.0/./pid.16588/x"), want);
        assert_eq!(
            d("/tmp/ompi.vm.0/jf.77/1/0"),
            Some(PathBuf::from("/tmp/ompi.vm.0/jf.77"))
        );
        // The per-user top dir holds other jobs' dirs: never captured whole.
        assert_eq!(d("/tmp/ompi.vm.0"), None);
        assert_eq!(d("/tmp/ompi.vm.0/pid.1/../pid.2"), None);
        assert_eq!(d("/var/tmp/ompi.vm.0/pid.1"), None);
        assert_eq!(d("/tmpx/ompi.vm.0/pid.1"), None);
        assert_eq!(d("relative/ompi.vm.0/pid.1"), None);
        let one = vec!["sess*".to_string()];
        assert_eq!(
            session_dir_of(Path::new("/tmp/sess1/a"), t, &one),
            Some(PathBuf::from("/tmp/sess1"))
        );
    }

    #[test]
    fn declared_session_dirs() {
        let r = super::super::CaptureRules::default();
        let ok = |p: &str| plausible_session_dir(Path::new(p), &r);
        assert!(ok("/tmp/ompi.vm.0/pid.7"));
        assert!(ok("/scratch/job/ompi.vm.0/pid.7"));
        assert!(!ok("/tmp"));
        assert!(!ok("/dev"));
        assert!(!ok("/dev/shm"));
        assert!(!ok("/"));
        assert!(!ok("/scratch"));
        assert!(!ok("/tmp/a/../.."));
        assert!(!ok("tmp/a/b"));
    }

    #[test]
    fn normal_form() {
        let v = |s: &[&str]| s.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(
            normalize(v(&[
                "/tmp/a.b",
                "/tmp/a/b",
                "/dev/shm/x",
                "/tmp/a",
                "/tmp/a/c/d",
                "/dev/shm/x"
            ])),
            v(&["/dev/shm/x", "/tmp/a", "/tmp/a.b"])
        );
        assert!(strictly_under(
            Path::new("/dev/shm/x"),
            Path::new("/dev/shm")
        ));
        assert!(!strictly_under(
            Path::new("/dev/shm"),
            Path::new("/dev/shm")
        ));
        assert!(!strictly_under(
            Path::new("/dev/shmx"),
            Path::new("/dev/shm")
        ));
    }
}
