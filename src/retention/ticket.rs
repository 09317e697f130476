//! The store's side of the keeper: each `PartFile` carries a [`Ticket`]
//! that announces its file when it is finished or kept, and lets go of it
//! when dropped. The announcements ([`Note`]s) wait in a channel until the
//! keeper's next turn.

use std::sync::mpsc::Sender;

/// What the store tells the keeper, through [`Ticket`]s.
#[derive(Debug)]
pub(super) enum Note {
    /// A file got its final name; its transfer still holds it.
    Finished { name: String, bytes: u64 },
    /// The transfer let go of a finished file.
    Released { name: String },
    /// An unfinished upload was kept (`name` has its suffix).
    Kept { name: String, bytes: u64 },
    /// A file announced earlier was removed by the store itself.
    Removed { name: String, bytes: u64 },
}

/// The store's end of the keeper's channel: hands out one [`Ticket`] per
/// file created.
#[derive(Debug, Clone)]
pub struct Recorder {
    pub(super) tx: Sender<Note>,
}

impl Recorder {
    /// A ticket for one new file.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            tx: self.tx.clone(),
            pinned: None,
        }
    }
}

/// One file's announcements to the keeper, carried by its `PartFile`.
/// Dropping it lets go of a finished file (see the module docs). Sending
/// never blocks (the channel is unbounded, and drained every turn).
#[derive(Debug)]
pub struct Ticket {
    tx: Sender<Note>,
    /// The final name, while the file is finished and held.
    pinned: Option<String>,
}

impl Ticket {
    /// The file got its final `name` and is `bytes` long.
    pub fn finished(&mut self, name: &str, bytes: u64) {
        self.pinned = Some(name.to_string());
        self.send(Note::Finished {
            name: name.to_string(),
            bytes,
        });
    }

    /// The unfinished file was kept as `name` (with its suffix).
    pub fn kept(&mut self, name: &str, bytes: u64) {
        self.send(Note::Kept {
            name: name.to_string(),
            bytes,
        });
    }

    /// The finished file was removed again (a failed directory sync).
    pub fn removed(&mut self, bytes: u64) {
        if let Some(name) = self.pinned.take() {
            self.send(Note::Removed { name, bytes });
        }
    }

    fn send(&self, note: Note) {
        // Fails only once the keeper is gone (the daemon is stopping).
        let _ = self.tx.send(note);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(name) = self.pinned.take() {
            self.send(Note::Released { name });
        }
    }
}
