//! Replay: a recording (a proxy's spool, a server's directory) sent again
//! as a load test, each file as one upload at its recorded time.
//!
//! The schedule is built once, before the run: each finished file's
//! arrival time (from its name, see `recording`) becomes an offset from the
//! first, divided by `--speed` and with every gap capped at `--max-wait`
//! (a recording that paused for a night should not make the replay sleep
//! for one). `--loop N` plays it N times, each pass one average gap after
//! the last; `--since`/`--until` keep a window of it; `--rate R` ignores
//! the recorded times and sends the files in name order, one every 1/R s.
//!
//! The run itself is the load generator's open loop, unchanged: the client
//! threads take slots in turn, wait for the slot's time, and measure each
//! latency from it ([`Replay::at`] is to a replay what `--rate`'s fixed
//! gap is to a plain run). A replay must be open-loop: a recording is a
//! list of arrivals, and users arrive whether or not the last one has been
//! served. A replay that waited for each answer before sending the next
//! would stop sending exactly when the system under test stalls, and hide
//! the stall (coordinated omission; docs/GUIDE.md section 13). When the
//! clients are all busy, the transfers due meanwhile start late, and the
//! summary says how many and by how much.
//!
//! Files are read from disk as they are sent, through one buffer per
//! client thread; only names and sizes are held in memory.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::recording::{micros, rfc3339, Bound, Recording};
use super::SizeRange;
use crate::cli::MAX_DURATION;
use crate::client::{ClientError, Source};

/// What to replay, and how (the command line's `--replay` options).
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub dir: PathBuf,
    /// 2 = twice as fast as recorded, 0.5 = half.
    pub speed: f64,
    /// Cap on any gap between two uploads, in replay time.
    pub max_wait: Option<Duration>,
    /// Passes over the recording.
    pub loops: u64,
    pub since: Option<Bound>,
    pub until: Option<Bound>,
    /// Ignore the recorded times: this many uploads a second, name order.
    pub rate: Option<f64>,
}

/// What a replay will do: printed by `--dry-run`, and echoed in the
/// summary's `config.replay`. Durations in seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReplayPlan {
    /// The directory replayed.
    pub dir: String,
    /// Files in one pass (after `--since`/`--until`), and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// `.part` and `.incomplete` files, not replayed.
    pub skipped_unfinished: u64,
    /// Hidden files and anything not a regular file, not replayed.
    pub skipped_other: u64,
    /// Finished files outside `--since`/`--until`.
    pub outside_window: u64,
    pub speed: f64,
    pub max_wait_s: Option<f64>,
    pub loops: u64,
    /// `--rate`: the recorded times were ignored.
    pub rate: Option<f64>,
    /// Uploads in all: files times loops.
    pub transfers: u64,
    /// Arrival of the first and last file replayed (absent with `--rate`
    /// on names without times).
    pub first_at: Option<String>,
    pub last_at: Option<String>,
    /// From the first file's arrival to the last's, as recorded.
    pub recorded_s: f64,
    /// From the first upload's scheduled start to the last's: how long the
    /// replay will take, plus the last upload's own transfer time.
    pub expected_s: f64,
    /// The longest gap between two consecutive files, as recorded and as
    /// the replay will have it (after `--speed` and `--max-wait`).
    pub longest_gap_s: f64,
    pub longest_gap_replay_s: f64,
}

/// One file of the schedule.
#[derive(Debug)]
struct Entry {
    name: OsString,
    size: u64,
    /// Its start, from the start of its pass.
    at: Duration,
}

/// The replay schedule: which file each slot sends, and when.
#[derive(Debug)]
pub struct Replay {
    dir: PathBuf,
    entries: Vec<Entry>,
    /// From one pass's first start to the next pass's.
    pass: Duration,
    rate: Option<f64>,
    pub plan: ReplayPlan,
}

/// The most a client thread's buffer for reading files grows to (it grows
/// only as large as the largest file the thread has sent): few enough
/// system calls per upload, and 1,000 clients replaying large files cost
/// 64 MiB (the plain load generator sends from one shared pool instead).
const READ_BUFFER: usize = 64 * 1024;

impl Replay {
    /// Reads the directory and builds the schedule. Errors are one line.
    pub fn plan(options: &ReplayOptions) -> Result<Replay, String> {
        let recording = Recording::read(&options.dir)?;
        let dir = options.dir.display();
        let windowed = options.since.is_some() || options.until.is_some();
        let recording = match (options.rate, recording.timed()) {
            (None, Err(untimed)) => {
                return Err(format!(
                    "--replay {dir}: {untimed}; to send every file in name order on a fixed schedule instead, add --rate R"
                ))
            }
            (Some(_), Err(untimed)) if windowed => {
                return Err(format!(
                    "--replay {dir}: {untimed}; --since and --until need the recorded times"
                ))
            }
            (Some(_), _) => recording.by_name(),
            (None, Ok(())) => recording,
        };
        let skipped = recording.skipped;
        let mut files = recording.files;
        let all = files.len() as u64;
        if windowed {
            // Every name carries a time here (checked above).
            let first = files[0].at.unwrap_or(std::time::UNIX_EPOCH);
            let last = files[files.len() - 1].at.unwrap_or(first);
            let since = options.since.as_ref().map(|b| b.resolve(first));
            let until = options.until.as_ref().map(|b| b.resolve(first));
            files.retain(|f| {
                f.at.is_some_and(|t| since.is_none_or(|s| t >= s) && until.is_none_or(|u| t <= u))
            });
            if files.is_empty() {
                return Err(format!(
                    "--replay {dir}: no file arrived between {} and {}; the recording runs from {} to {}",
                    since.map_or("its start".into(), rfc3339),
                    until.map_or("its end".into(), rfc3339),
                    rfc3339(first),
                    rfc3339(last)
                ));
            }
        }

        let span = match (files[0].at, files[files.len() - 1].at) {
            (Some(first), Some(last)) => micros(last).saturating_sub(micros(first)),
            _ => 0,
        };
        let mut plan = ReplayPlan {
            dir: options.dir.display().to_string(),
            files: files.len() as u64,
            bytes: files.iter().map(|f| f.size).sum(),
            skipped_unfinished: skipped.unfinished,
            skipped_other: skipped.other,
            outside_window: all - files.len() as u64,
            speed: options.speed,
            max_wait_s: options.max_wait.map(|d| d.as_secs_f64()),
            loops: options.loops,
            rate: options.rate,
            transfers: (files.len() as u64).saturating_mul(options.loops),
            first_at: files[0].at.map(rfc3339),
            last_at: files[files.len() - 1].at.map(rfc3339),
            recorded_s: Duration::from_micros(span).as_secs_f64(),
            ..ReplayPlan::default()
        };
        // The schedule of one pass. Gaps are whole microseconds, as named.
        let mut entries = Vec::with_capacity(files.len());
        let mut at = Duration::ZERO;
        let mut previous = None;
        for f in files {
            if let (Some(t), Some(p)) = (f.at, previous) {
                let gap_us = micros(t).saturating_sub(micros(p));
                let recorded = Duration::from_micros(gap_us);
                // Saturating: a replay that long is refused below.
                let mut replayed =
                    Duration::try_from_secs_f64(recorded.as_secs_f64() / options.speed)
                        .unwrap_or(Duration::MAX);
                if let Some(cap) = options.max_wait {
                    replayed = replayed.min(cap);
                }
                plan.longest_gap_s = plan.longest_gap_s.max(recorded.as_secs_f64());
                plan.longest_gap_replay_s = plan.longest_gap_replay_s.max(replayed.as_secs_f64());
                at = at.saturating_add(replayed);
            }
            previous = f.at;
            entries.push(Entry {
                name: f.name,
                size: f.size,
                at,
            });
        }
        // The next pass starts one average gap after this one's last file.
        let n = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        let pass = if n > 1 {
            at.saturating_add(at / (n - 1))
        } else {
            at
        };
        let mut replay = Replay {
            dir: options.dir.clone(),
            entries,
            pass,
            rate: options.rate,
            plan,
        };
        if let Some(r) = options.rate {
            replay.plan.longest_gap_replay_s = 1.0 / r;
        }
        let slots = replay.plan.transfers;
        let expected = replay.at_checked(slots - 1);
        match expected {
            Some(d) if d <= MAX_DURATION => replay.plan.expected_s = d.as_secs_f64(),
            _ => {
                return Err(format!(
                    "--replay {dir}: the replay would take more than {}: raise --speed, or cap the gaps with --max-wait",
                    humantime::format_duration(MAX_DURATION)
                ))
            }
        }
        Ok(replay)
    }

    /// Uploads in the whole replay.
    pub fn slots(&self) -> u64 {
        self.plan.transfers
    }

    /// When slot `slot` starts, from the start of the replay.
    pub fn at(&self, slot: u64) -> Duration {
        // The plan checked the last slot against MAX_DURATION; earlier
        // slots come sooner.
        self.at_checked(slot).unwrap_or(MAX_DURATION)
    }

    fn at_checked(&self, slot: u64) -> Option<Duration> {
        if let Some(rate) = self.rate {
            return Duration::try_from_secs_f64(slot as f64 / rate).ok();
        }
        let n = self.entries.len() as u64;
        let pass = u32::try_from(slot / n).ok()?;
        self.pass
            .checked_mul(pass)?
            .checked_add(self.entries[(slot % n) as usize].at)
    }

    /// Transfers a second asked for, on average over the whole replay (0
    /// when every upload is due at the same moment).
    pub fn offered_rate(&self) -> f64 {
        match self.rate {
            Some(r) => r,
            None if self.plan.expected_s > 0.0 => (self.slots() - 1) as f64 / self.plan.expected_s,
            None => 0.0,
        }
    }

    /// The range of the files' sizes, for the summary.
    pub fn sizes(&self) -> SizeRange {
        let sizes = self.entries.iter().map(|e| e.size);
        SizeRange {
            min: sizes.clone().min().unwrap_or(0),
            max: sizes.max().unwrap_or(0),
        }
    }

    /// The file slot `slot` sends, for messages.
    pub fn path(&self, slot: u64) -> PathBuf {
        let entry = &self.entries[(slot % self.entries.len() as u64) as usize];
        self.dir.join(&entry.name)
    }

    /// Opens the file of slot `slot`, to be read as it is sent, into `buf`.
    /// Opened before connecting, so a file that went away costs the system
    /// under test nothing. Never follows a symlink, and never blocks on a
    /// FIFO swapped in since the directory was read.
    pub(super) fn open<'a>(
        &self,
        slot: u64,
        buf: &'a mut Vec<u8>,
    ) -> Result<FileSource<'a>, ClientError> {
        let path = self.path(slot);
        let fail = |e: io::Error| ClientError::Source(path.display().to_string(), e);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(fail)?;
        let meta = file.metadata().map_err(fail)?;
        if !meta.is_file() {
            return Err(fail(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let want = usize::try_from(meta.len()).map_or(READ_BUFFER, |n| n.clamp(1, READ_BUFFER));
        if buf.len() < want {
            buf.resize(want, 0);
        }
        Ok(FileSource { file, buf })
    }
}

/// A recorded file as an upload, read a buffer at a time.
pub(super) struct FileSource<'a> {
    file: File,
    buf: &'a mut Vec<u8>,
}

impl Source for FileSource<'_> {
    fn next_chunk(&mut self) -> io::Result<&[u8]> {
        loop {
            match self.file.read(self.buf) {
                Ok(n) => return Ok(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl ReplayPlan {
    /// One line for the load summary.
    pub fn brief(&self) -> String {
        let schedule = match self.rate {
            Some(r) => format!("--rate {r}"),
            None => format!("speed {}", self.speed),
        };
        format!(
            "{} files from {} ({} skipped), {schedule}, {} pass{}: {:.3} s planned",
            self.files,
            self.dir,
            self.skipped_unfinished + self.skipped_other,
            self.loops,
            plural(self.loops),
            self.expected_s
        )
    }
}

/// "es" for more than one pass.
fn plural(passes: u64) -> &'static str {
    if passes == 1 {
        ""
    } else {
        "es"
    }
}

impl fmt::Display for ReplayPlan {
    /// What `--dry-run` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "stopover load --replay {}: dry run, nothing sent",
            self.dir
        )?;
        writeln!(
            f,
            "  files             {} ({:.1} MB); skipped {} unfinished (.part, .incomplete), {} other",
            self.files,
            self.bytes as f64 / 1e6,
            self.skipped_unfinished,
            self.skipped_other
        )?;
        if self.outside_window > 0 {
            writeln!(
                f,
                "  window            {} files outside --since/--until left out",
                self.outside_window
            )?;
        }
        if let (Some(first), Some(last)) = (&self.first_at, &self.last_at) {
            writeln!(
                f,
                "  recording         {:.3} s, from {first} to {last}",
                self.recorded_s
            )?;
        }
        let schedule = match (self.rate, self.max_wait_s) {
            (Some(r), _) => format!("--rate {r}, recorded times ignored"),
            (None, Some(cap)) => format!("speed {}, gaps capped at {cap} s", self.speed),
            (None, None) => format!("speed {}, no cap on gaps", self.speed),
        };
        writeln!(
            f,
            "  replay            {:.3} s for {} uploads ({schedule}; {} pass{})",
            self.expected_s,
            self.transfers,
            self.loops,
            plural(self.loops)
        )?;
        write!(
            f,
            "  longest gap       {:.3} s recorded, {:.3} s in the replay",
            self.longest_gap_s, self.longest_gap_replay_s
        )
    }
}

/// A positive `--speed`.
pub fn parse_speed(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (1e-6..=1e6).contains(&s) => Ok(s),
        _ => Err(format!(
            "{text:?}: want a factor from 0.000001 to 1000000, e.g. 2 (twice as fast) or 0.5 (half)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A directory of empty recorded files arriving at these offsets (ms).
    fn recording(offsets_ms: &[u64]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (i, ms) in offsets_ms.iter().enumerate() {
            let t = humantime::parse_rfc3339("2026-11-25T12:00:00Z").unwrap()
                + Duration::from_millis(*ms);
            let stamp: String = rfc3339(t).chars().filter(|c| !"-:".contains(*c)).collect();
            std::fs::write(dir.path().join(format!("{stamp}-7-{i:06}")), vec![1; i]).unwrap();
        }
        dir
    }

    fn options(dir: &Path) -> ReplayOptions {
        ReplayOptions {
            dir: dir.to_path_buf(),
            speed: 1.0,
            max_wait: None,
            loops: 1,
            since: None,
            until: None,
            rate: None,
        }
    }

    fn starts(r: &Replay) -> Vec<u64> {
        (0..r.slots()).map(|s| r.at(s).as_millis() as u64).collect()
    }

    #[test]
    fn the_schedule_follows_the_recording_at_any_speed() {
        let dir = recording(&[0, 100, 300, 30_300]);
        let mut o = options(dir.path());
        let r = Replay::plan(&o).unwrap();
        assert_eq!(starts(&r), [0, 100, 300, 30_300]);
        assert_eq!(r.plan.files, 4);
        assert_eq!(r.plan.bytes, 6);
        assert_eq!(r.sizes(), SizeRange { min: 0, max: 3 });
        assert_eq!(r.plan.recorded_s, 30.3);
        assert_eq!(r.plan.longest_gap_s, 30.0);
        o.speed = 2.0;
        let r = Replay::plan(&o).unwrap();
        assert_eq!(starts(&r), [0, 50, 150, 15_150]);
        assert_eq!(r.plan.expected_s, 15.15);
        assert_eq!(r.plan.longest_gap_replay_s, 15.0);
        // The cap applies to the replay's gaps, after the speed.
        o.max_wait = Some(Duration::from_millis(120));
        let r = Replay::plan(&o).unwrap();
        assert_eq!(starts(&r), [0, 50, 150, 270]);
        assert_eq!(
            (r.plan.longest_gap_s, r.plan.longest_gap_replay_s),
            (30.0, 0.12)
        );
        assert!((r.offered_rate() - 3.0 / 0.27).abs() < 1e-9);
    }

    #[test]
    fn loops_follow_each_other_one_average_gap_apart() {
        let dir = recording(&[0, 100, 400]);
        let mut o = options(dir.path());
        o.loops = 3;
        let r = Replay::plan(&o).unwrap();
        assert_eq!(starts(&r), [0, 100, 400, 600, 700, 1000, 1200, 1300, 1600]);
        assert_eq!(r.plan.transfers, 9);
        assert_eq!(r.plan.expected_s, 1.6);
        assert_eq!(r.path(4), dir.path().join(&r.entries[1].name));
    }

    #[test]
    fn a_window_keeps_part_of_the_recording() {
        let dir = recording(&[0, 100, 200, 300, 400]);
        let mut o = options(dir.path());
        o.since = Some(Bound::Offset(Duration::from_millis(100)));
        o.until = Some("0.3s".parse().unwrap());
        let r = Replay::plan(&o).unwrap();
        assert_eq!(starts(&r), [0, 100, 200]);
        assert_eq!(r.plan.outside_window, 2);
        assert_eq!(
            r.plan.first_at.as_deref(),
            Some("2026-11-25T12:00:00.100000Z")
        );
        o.since = Some("2026-11-25T12:00:00.350Z".parse().unwrap());
        o.until = None;
        let r = Replay::plan(&o).unwrap();
        assert_eq!(r.plan.files, 1);
        o.since = Some("1h".parse().unwrap());
        let e = Replay::plan(&o).unwrap_err();
        assert!(
            e.contains("no file arrived between") && e.contains("runs from"),
            "{e}"
        );
    }

    #[test]
    fn a_rate_ignores_the_recorded_times_and_takes_any_names() {
        let dir = recording(&[0, 5_000, 5_001]);
        std::fs::write(dir.path().join("zz-notes.txt"), b"x").unwrap();
        let mut o = options(dir.path());
        let e = Replay::plan(&o).unwrap_err();
        assert!(
            e.contains("carry no arrival time") && e.contains("--rate"),
            "{e}"
        );
        o.rate = Some(10.0);
        o.loops = 2;
        let r = Replay::plan(&o).unwrap();
        assert_eq!(starts(&r), [0, 100, 200, 300, 400, 500, 600, 700]);
        assert!(r.path(3).ends_with("zz-notes.txt"), "name order");
        assert_eq!(r.plan.expected_s, 0.7);
        assert_eq!(r.offered_rate(), 10.0);
        o.since = Some("1s".parse().unwrap());
        let e = Replay::plan(&o).unwrap_err();
        assert!(e.contains("need the recorded times"), "{e}");
    }

    #[test]
    fn a_replay_longer_than_any_duration_is_refused() {
        let dir = recording(&[0, 1000]);
        let mut o = options(dir.path());
        o.speed = 1e-9;
        let e = Replay::plan(&o).unwrap_err();
        assert!(e.contains("--speed") && e.contains("--max-wait"), "{e}");
    }

    #[test]
    fn a_file_is_read_as_it_is_sent_and_never_through_a_link() {
        let dir = recording(&[0, 10]);
        let r = Replay::plan(&options(dir.path())).unwrap();
        let mut buf = Vec::new();
        let mut source = r.open(1, &mut buf).unwrap();
        assert_eq!(source.next_chunk().unwrap(), [1]);
        assert!(source.next_chunk().unwrap().is_empty());
        drop(source);
        let path = r.path(0);
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        assert!(matches!(r.open(0, &mut buf), Err(ClientError::Source(..))));
    }

    #[test]
    fn speeds_parse() {
        assert_eq!(parse_speed("2"), Ok(2.0));
        assert_eq!(parse_speed("0.5"), Ok(0.5));
        for bad in ["0", "-1", "fast", "inf", "NaN"] {
            assert!(parse_speed(bad).is_err(), "{bad}");
        }
    }
}
