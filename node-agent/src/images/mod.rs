//! Image files: packing CRIU output into few large files.

pub mod beneath;
pub mod follow;
pub mod opened;
pub mod pack;
