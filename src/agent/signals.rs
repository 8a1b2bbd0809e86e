//! SIGTERM / SIGINT, caught from the first instant and remembered: the entrypoint decides per phase what a
//! termination request means (stop registering, forward to the listener, or finish deregistering).

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Watches for termination requests.
#[derive(Clone, Debug)]
pub struct Termination {
    rx: watch::Receiver<Option<Signal>>,
    /// Keeps the channel open for a watcher without a signal task ([`Termination::never`]).
    _tx: Option<std::sync::Arc<watch::Sender<Option<Signal>>>>,
}

impl Termination {
    /// Installs the handlers (call before anything else can take time).
    pub fn install() -> std::io::Result<Termination> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                let sig = tokio::select! {
                    Some(()) = term.recv() => Signal::SIGTERM,
                    Some(()) = int.recv() => Signal::SIGINT,
                    else => break,
                };
                // Remember the first request; later ones change nothing (Kubernetes sends one SIGTERM,
                // then SIGKILL when the grace period ends).
                tx.send_if_modified(|cur| {
                    if cur.is_none() {
                        *cur = Some(sig);
                        true
                    } else {
                        false
                    }
                });
            }
        });
        Ok(Termination { rx, _tx: None })
    }

    /// A watcher that never fires (tests).
    pub fn never() -> Termination {
        Self::manual().1
    }

    /// A watcher fired by hand (tests): send `Some(signal)` on the sender.
    pub fn manual() -> (watch::Sender<Option<Signal>>, Termination) {
        let (tx, rx) = watch::channel(None);
        let keep = tx.clone();
        (
            tx,
            Termination {
                rx,
                _tx: Some(std::sync::Arc::new(keep)),
            },
        )
    }

    /// The signal received so far, if any.
    pub fn requested(&self) -> Option<Signal> {
        *self.rx.borrow()
    }

    /// Resolves when a termination was requested (at once if it already was).
    pub async fn wait(&mut self) -> Signal {
        loop {
            if let Some(s) = *self.rx.borrow_and_update() {
                return s;
            }
            if self.rx.changed().await.is_err() {
                // The watcher task ended: no signal will ever come.
                std::future::pending::<()>().await;
            }
        }
    }
}
