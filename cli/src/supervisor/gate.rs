//! Holding a restored tree until its page files are verified.

use std::thread::{self, JoinHandle};

use anyhow::Result;
use ckpt_agent::checkpoint::{self};
use ckpt_agent::criu::{NotifyEvent, NotifyHandler};
use ckpt_agent::images::opened::OpenedImage;

/// Verifies the page files in the background and holds the restored tree
/// at CRIU's post-restore point until they match.
pub(super) struct PagesGate {
    check: Option<JoinHandle<Result<(), String>>>,
    result: Option<Result<(), String>>,
}

impl PagesGate {
    pub(super) fn start(opened: OpenedImage) -> Self {
        let check = thread::spawn(move || {
            opened
                .verify(checkpoint::is_epoch_pages)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        Self {
            check: Some(check),
            result: None,
        }
    }

    fn wait(&mut self) -> Result<(), String> {
        if let Some(t) = self.check.take() {
            self.result = Some(
                t.join()
                    .unwrap_or_else(|_| Err("page verification panicked".into())),
            );
        }
        self.result.clone().unwrap_or(Ok(()))
    }

    pub(super) fn finish(mut self) -> Result<(), String> {
        self.wait()
    }
}

impl NotifyHandler for PagesGate {
    fn notify(&mut self, event: &NotifyEvent, _pid: i32) -> Result<(), String> {
        match event {
            NotifyEvent::PostRestore => {
                tracing::info!(phase = "post-restore", "waiting for page verification");
                let r = self.wait();
                tracing::info!(
                    phase = "post-restore",
                    ok = r.is_ok(),
                    "page verification done"
                );
                r
            }
            _ => Ok(()),
        }
    }
}
