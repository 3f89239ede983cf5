//! One line for an error and its causes, for the daemons' exit message.
//!
//! Many of our errors already quote their source in their own message
//! (`cannot read key file K: No such file…`), so printing the whole chain
//! would repeat it; a cause whose text the line already holds is left out.

use std::error::Error;

/// `outer: inner: innermost`, without repeats.
pub fn error_chain(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading k: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading")]
    struct Outer(#[source] Quoting);

    #[test]
    fn causes_are_not_repeated() {
        let e = Outer(Quoting {
            source: std::io::Error::other("gone"),
        });
        assert_eq!(error_chain(&e), "loading: reading k: gone");
    }
}
