//! The pack format.
