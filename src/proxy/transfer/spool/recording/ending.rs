//! How a recording ends (see the module docs of `recording`): trimmed,
//! renamed through the ring to its final name or `.incomplete`, or
//! removed; then its descriptors closed through the ring.

use std::io;

use super::{Direct, Ended, Goal, Recording};
use crate::event_loop::disk::Disk;
use crate::sys;

/// Where the rename that ends a recording stands (it goes through the ring:
/// a rename waits for its directory's lock).
#[derive(Debug)]
pub(super) enum Naming {
    NotAsked,
    /// Asked for, to the final name (`finish`) or to `.incomplete`.
    Asked {
        finish: bool,
    },
    Done {
        result: io::Result<()>,
        finish: bool,
    },
}

impl Recording {
    /// Moves the recording on towards its goal (see the module docs):
    /// `None` while something is still in flight, then how it ended. For a
    /// live upload (`Finish`), `Err` when it cannot take its final name
    /// (the caller may then ask for `Keep`).
    pub fn advance_to_end(&mut self, disk: &mut Disk) -> Option<io::Result<Ended>> {
        let Some(part) = self.part.as_mut() else {
            return Some(Ok(Ended::Removed));
        };
        if part.is_finished() {
            return Some(Ok(Ended::Finished(part.path().to_path_buf())));
        }
        if matches!(self.naming, Naming::Asked { .. }) {
            return None; // whatever the goal is now, the rename decides
        }
        let valid = match &self.failed {
            Some((at, _, _)) => part.bytes().min(*at),
            None => part.bytes(),
        };
        let goal = match self.goal {
            Goal::Finish if self.failed.is_some() => Goal::Keep,
            g => g,
        };
        let renamed = matches!(self.naming, Naming::Done { result: Ok(()), .. });
        if !renamed && (goal == Goal::Discard || (goal == Goal::Keep && valid == 0)) {
            // Writes in flight land in the unlinked file.
            self.remove(disk);
            return Some(Ok(Ended::Removed));
        }
        if self.in_flight > 0 {
            return None;
        }
        // Trim first: reserved space past the data, or anything past the
        // valid prefix.
        let want = if goal == Goal::Keep {
            Some(valid)
        } else {
            part.trim_due()
        };
        if let Some(len) = want {
            if self.trimmed_to != Some(len) {
                disk.truncate(part.shared_file(), len, self.owner);
                self.trimmed_to = Some(len);
                self.in_flight += 1;
                return None;
            }
            part.trimmed();
        }
        // Then the rename, through the ring. Its outcome is read against
        // the name it was asked for, whatever the goal is by then.
        let naming = std::mem::replace(&mut self.naming, Naming::NotAsked);
        let finish = match naming {
            Naming::Done { finish, .. } => finish,
            _ => goal == Goal::Finish,
        };
        let (from, to) = if finish {
            let (from, to) = part.part_and_final_paths();
            (from.to_path_buf(), to.to_path_buf())
        } else {
            (part.path().to_path_buf(), part.incomplete_path())
        };
        match naming {
            Naming::NotAsked | Naming::Asked { .. } => {
                match (sys::cpath(&from), sys::cpath(&to)) {
                    (Ok(from), Ok(to)) => disk.rename(from, to, self.owner),
                    (Err(e), _) | (_, Err(e)) => return Some(Err(e)),
                }
                self.naming = Naming::Asked { finish };
                self.in_flight += 1;
                None
            }
            Naming::Done { result: Ok(()), .. } if finish => {
                part.named_final();
                log::trace!("proxy: #{} disk renamed {}", self.owner.key, part.name());
                if self.overflowed > 0 {
                    // What overflowed through the page cache leaves it (pages
                    // still being written back stay until they are clean).
                    disk.drop_cached(part.shared_file());
                }
                Some(Ok(Ended::Finished(to)))
            }
            Naming::Done { result: Ok(()), .. } => {
                part.named_incomplete(valid);
                self.close_files(disk);
                Some(Ok(Ended::Kept(to, valid)))
            }
            Naming::Done { result: Err(e), .. } if finish => Some(Err(io::Error::new(
                e.kind(),
                format!("renaming {} to its final name: {e}", from.display()),
            ))),
            Naming::Done { result: Err(e), .. } => {
                // Not even a rename fits (a full directory on a full disk):
                // the bytes go, but no `.part` outlives its transfer.
                self.remove(disk);
                Some(Err(io::Error::new(
                    e.kind(),
                    format!(
                        "renaming {} to {}: {e}; removing it",
                        from.display(),
                        to.display()
                    ),
                )))
            }
        }
    }

    /// Removes the unfinished file and lets go of its descriptors, both
    /// through the ring.
    fn remove(&mut self, disk: &mut Disk) {
        if let Some(part) = self.part.as_ref() {
            match sys::cpath(part.path()) {
                Ok(path) => disk.unlink(path, None),
                Err(e) => log::warn!("removing {}: {e}", part.path().display()),
            }
        }
        self.close_files(disk);
    }

    /// Hands the file's descriptors to the disk, which closes each once no
    /// operation in flight holds it (through the ring: see
    /// `Disk::release`). A finished file's bookkeeping goes with them.
    pub fn close_files(&mut self, disk: &mut Disk) {
        if let Direct::On(file) = std::mem::replace(&mut self.direct, Direct::Off) {
            disk.release(file);
        }
        if let Some(part) = self.part.take() {
            disk.release(part.into_file());
        }
    }
}
