//! The keeper's deleting: through its own `io_uring` where there is one,
//! otherwise here on the loop, a little each turn (see the module docs of
//! `retention` for why, and what an unlink costs).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use super::ledger::{Doomed, Hold};
use super::{Keeper, CUT_STEP, MAX_STEPS_PER_TURN, MAX_UNLINKS_IN_FLIGHT, TURN_BUDGET};

/// A file unlinked but still open, being cut down (see [`CUT_STEP`]).
pub(super) struct Cut {
    file: File,
    pub(super) left: u64,
}

impl Keeper {
    /// Hands what was chosen to the kernel's unlinks, and takes in the
    /// ones that completed. Without a ring: deletes (or cuts down) here,
    /// for at most [`TURN_BUDGET`].
    pub(super) fn delete_some(&mut self) {
        let Some(mut ring) = self.ring.take() else {
            return self.delete_here();
        };
        for (id, result) in ring.reap() {
            if let Some(doomed) = self.unlinking.remove(&id) {
                self.unlinking_bytes -= doomed.bytes;
                self.unlinked(doomed, result, None);
            }
        }
        let mut queued = false;
        while self.unlinking.len() < MAX_UNLINKS_IN_FLIGHT {
            let Some(doomed) = self.doomed.pop_front() else {
                break;
            };
            match ring.unlink(&self.dir.join(&doomed.name)) {
                Ok(id) => {
                    self.doomed_bytes -= doomed.bytes;
                    self.unlinking_bytes += doomed.bytes;
                    self.unlinking.insert(id, doomed);
                    queued = true;
                }
                Err(e) => {
                    self.doomed.push_front(doomed);
                    return self.ring_failed(e);
                }
            }
        }
        // All of this turn's unlinks go to the kernel in one call.
        if queued {
            if let Err(e) = ring.submit() {
                return self.ring_failed(e);
            }
        }
        self.ring = Some(ring);
    }

    /// The ring failed us (it has been dropped): from now on, unlinks are
    /// done here. Those in flight may have happened; done again here, they
    /// are merely found gone.
    fn ring_failed(&mut self, e: io::Error) {
        log::info!(
            "{}: retention: io_uring unlink failed ({e}): unlinks run on the loop from now on",
            self.role
        );
        for (_, d) in self.unlinking.drain() {
            self.doomed_bytes += d.bytes;
            self.doomed.push_front(d);
        }
        self.unlinking_bytes = 0;
    }

    /// Deletes (or cuts down) what was chosen, here, for at most
    /// [`TURN_BUDGET`].
    fn delete_here(&mut self) {
        let start = Instant::now();
        for step in 0..MAX_STEPS_PER_TURN {
            if step > 0 && start.elapsed() >= TURN_BUDGET {
                break;
            }
            if let Some(cut) = self.cutting.as_mut() {
                let left = cut.left.saturating_sub(CUT_STEP);
                if let Err(e) = cut.file.set_len(left) {
                    // Closing it frees the rest in one go; so be it.
                    log::debug!("{}: cutting a deleted file down: {e}", self.role);
                    self.cutting = None;
                    continue;
                }
                cut.left = left;
                if left == 0 {
                    self.cutting = None; // closed: nothing left to free
                }
                continue;
            }
            let Some(doomed) = self.doomed.pop_front() else {
                break;
            };
            self.doomed_bytes -= doomed.bytes;
            self.delete(doomed);
        }
    }

    /// Unlinks one file; a large one is opened first, to be cut down after.
    fn delete(&mut self, doomed: Doomed) {
        let path = self.dir.join(&doomed.name);
        let open = if doomed.bytes > CUT_STEP {
            open_to_cut(&path)
        } else {
            None
        };
        let result = fs::remove_file(&path);
        self.unlinked(doomed, result, open);
    }

    /// Books the result of one unlink (`open`: the file, to cut down).
    fn unlinked(&mut self, doomed: Doomed, result: io::Result<()>, open: Option<(File, u64)>) {
        let path = self.dir.join(&doomed.name);
        match result {
            Ok(()) => {
                log::debug!(
                    "{}: retention: deleted {} ({} bytes)",
                    self.role,
                    path.display(),
                    doomed.bytes
                );
                self.deleted_files += 1;
                self.deleted_bytes += doomed.bytes;
                self.cutting = open.map(|(file, left)| Cut { file, left });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Someone else deleted it: off the books, not counted.
                log::debug!(
                    "{}: retention: {} was already gone",
                    self.role,
                    path.display()
                );
            }
            Err(e) => {
                self.warnings.warn(format_args!(
                    "{}: retention: deleting {}: {e}; left in place",
                    self.role,
                    path.display()
                ));
                self.ledger.add(doomed.name, doomed.bytes, Hold::Stuck);
            }
        }
    }
}

/// Opens a file about to be unlinked, so that its space can be given back
/// in steps; `None` if it is not a regular file we can open.
fn open_to_cut(path: &Path) -> Option<(File, u64)> {
    // O_NOFOLLOW and O_NONBLOCK, as everywhere a name is opened: never a
    // symlink, never a wait on a FIFO.
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    let len = meta.len();
    meta.is_file().then_some((file, len))
}
