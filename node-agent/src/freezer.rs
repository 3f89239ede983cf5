//! Freezing a job tree with the cgroup freezer.
