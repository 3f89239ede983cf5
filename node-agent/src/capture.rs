//! Node-local state capture.
