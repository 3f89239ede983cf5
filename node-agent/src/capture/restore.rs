//! Putting written files back to their dump-time size before CRIU restores.

use std::fs;
use std::io;

use super::{CaptureError, WritableFile};

/// At restore, before CRIU runs: truncates every file that grew since the
/// dump back to its dump-time size, so CRIU's size check passes and the job
/// rewrites the tail it wrote after the checkpoint.
///
/// Every file is checked before any is touched: a file that is missing, is no
/// longer a regular file, or is shorter than at dump (data the restored job
/// believes written is gone) fails the whole call with an error naming it,
/// and nothing is truncated.
pub fn restore_writable_sizes(files: &[WritableFile]) -> Result<(), CaptureError> {
    let mut grown = Vec::new();
    for f in files {
        let meta = match fs::metadata(&f.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CaptureError::Missing {
                    path: f.path.clone(),
                    size: f.size,
                })
            }
            Err(e) => {
                return Err(CaptureError::Io {
                    what: "stat",
                    path: f.path.clone(),
                    source: e,
                })
            }
        };
        if !meta.is_file() {
            return Err(CaptureError::NotRegular {
                path: f.path.clone(),
            });
        }
        if meta.len() < f.size {
            return Err(CaptureError::Shrunk {
                path: f.path.clone(),
                expected: f.size,
                actual: meta.len(),
            });
        }
        if meta.len() > f.size {
            grown.push((f, meta.len()));
        }
    }
    for (f, was) in grown {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&f.path)
            .map_err(|e| CaptureError::Io {
                what: "open for truncate",
                path: f.path.clone(),
                source: e,
            })?;
        file.set_len(f.size)
            .and_then(|()| file.sync_all())
            .map_err(|e| CaptureError::Io {
                what: "truncate",
                path: f.path.clone(),
                source: e,
            })?;
        tracing::info!(path = %f.path.display(), from = was, to = f.size, "truncated grown output file to its dump-time size");
    }
    Ok(())
}
