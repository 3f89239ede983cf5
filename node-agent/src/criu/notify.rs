//! CRIU's action-script points, delivered over RPC (`notify_scripts`).

use std::fmt;

/// A point in a dump or restore at which CRIU asks its client to act (the
/// RPC form of CRIU's action scripts). The names in parentheses are CRIU's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyEvent {
    /// ("pre-dump") Before CRIU freezes and seizes the tree.
    PreDump,
    /// ("post-dump") All images are written; the tree is still frozen.
    /// Refusing it makes the dump fail and the tree resume.
    PostDump,
    /// ("network-lock") CRIU is about to lock the tree's network.
    NetworkLock,
    /// ("network-unlock") CRIU is about to unlock the tree's network.
    NetworkUnlock,
    /// ("pre-restore") Before CRIU creates any task.
    PreRestore,
    /// ("post-restore") Every task is restored but still held by CRIU
    /// (not yet running; network still locked). Carries the root's pid.
    /// Refusing it kills the restored tree.
    PostRestore,
    /// ("pre-resume") Just before the tasks are released. CRIU ignores a
    /// refusal here.
    PreResume,
    /// ("post-resume") The tasks run. CRIU ignores a refusal here.
    PostResume,
    /// ("setup-namespaces") The root's namespaces exist. Carries its pid.
    SetupNamespaces,
    /// ("post-setup-namespaces").
    PostSetupNamespaces,
    /// ("orphan-pts-master") CRIU passes the master of an orphan pty; the
    /// client closes the descriptor it receives.
    OrphanPtsMaster,
    /// Any other script name, e.g. "query-ext-files" or "status-ready".
    Other(String),
}

impl NotifyEvent {
    /// Maps CRIU's script name to an event.
    pub fn from_script(name: &str) -> Self {
        match name {
            "pre-dump" => Self::PreDump,
            "post-dump" => Self::PostDump,
            "network-lock" => Self::NetworkLock,
            "network-unlock" => Self::NetworkUnlock,
            "pre-restore" => Self::PreRestore,
            "post-restore" => Self::PostRestore,
            "pre-resume" => Self::PreResume,
            "post-resume" => Self::PostResume,
            "setup-namespaces" => Self::SetupNamespaces,
            "post-setup-namespaces" => Self::PostSetupNamespaces,
            "orphan-pts-master" => Self::OrphanPtsMaster,
            other => Self::Other(other.to_string()),
        }
    }

    /// CRIU's script name for the event.
    pub fn script_name(&self) -> &str {
        match self {
            Self::PreDump => "pre-dump",
            Self::PostDump => "post-dump",
            Self::NetworkLock => "network-lock",
            Self::NetworkUnlock => "network-unlock",
            Self::PreRestore => "pre-restore",
            Self::PostRestore => "post-restore",
            Self::PreResume => "pre-resume",
            Self::PostResume => "post-resume",
            Self::SetupNamespaces => "setup-namespaces",
            Self::PostSetupNamespaces => "post-setup-namespaces",
            Self::OrphanPtsMaster => "orphan-pts-master",
            Self::Other(name) => name,
        }
    }
}

impl fmt::Display for NotifyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.script_name())
    }
}

/// Receives CRIU's notifications during a dump or restore with
/// `notify_scripts` set. It runs on the calling thread while CRIU waits,
/// so the tree stays in whatever state CRIU left it (frozen, held) until
/// it returns.
pub trait NotifyHandler {
    /// Called at each event; `pid` is the root's real pid for
    /// [`NotifyEvent::PostRestore`] and [`NotifyEvent::SetupNamespaces`],
    /// 0 otherwise. `Err(reason)` answers `notify_success = false`, which
    /// makes CRIU abort (except at pre-resume / post-resume, which CRIU
    /// only logs); the reason ends up in [`CriuError::Failed`](super::CriuError::Failed).
    fn notify(&mut self, event: &NotifyEvent, pid: i32) -> Result<(), String>;
}

/// A handler that accepts every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoNotify;

impl NotifyHandler for NoNotify {
    fn notify(&mut self, _event: &NotifyEvent, _pid: i32) -> Result<(), String> {
        Ok(())
    }
}

impl<F> NotifyHandler for F
where
    F: FnMut(&NotifyEvent, i32) -> Result<(), String>,
{
    fn notify(&mut self, event: &NotifyEvent, pid: i32) -> Result<(), String> {
        self(event, pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_names_round_trip() {
        for name in [
            "pre-dump",
            "post-dump",
            "network-lock",
            "network-unlock",
            "pre-restore",
            "post-restore",
            "pre-resume",
            "post-resume",
            "setup-namespaces",
            "post-setup-namespaces",
            "orphan-pts-master",
            "query-ext-files",
        ] {
            assert_eq!(NotifyEvent::from_script(name).script_name(), name);
        }
        assert_eq!(
            NotifyEvent::from_script("status-ready"),
            NotifyEvent::Other("status-ready".into())
        );
    }
}
