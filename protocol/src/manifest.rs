//! The on-disk epoch manifest.
