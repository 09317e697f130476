//! What the bench measures: the scenarios, their sizes in each preset, and
//! the warm-up version of each.

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Preset {
    Full,
    Quick,
    Smoke,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub what: String,
    pub clients: usize,
    pub transfers: u64,
    pub size: u64,
    pub all_at_once: bool,
    pub reps: usize,
}

pub fn scenarios(preset: Preset) -> Vec<Scenario> {
    let s = |name, clients: usize, transfers: u64, size: u64, all_at_once, reps| Scenario {
        name,
        what: if all_at_once {
            format!("{clients} clients x {} at once", human(size))
        } else {
            format!("{clients} clients, {transfers} x {}", human(size))
        },
        clients,
        transfers,
        size,
        all_at_once,
        reps,
    };
    const K: u64 = 1024;
    match preset {
        Preset::Full => vec![
            s("bulk", 1, 1, K * K * K, false, 5),
            s("small", 64, 12_000, K, false, 3),
            s("medium", 32, 2_000, K * K, false, 3),
            s("concurrency", 5_000, 5_000, 64 * K, true, 3),
            s("active", 1_000, 3_000, K * K, false, 3),
        ],
        Preset::Quick => vec![
            s("bulk", 1, 1, 256 * K * K, false, 3),
            s("small", 64, 4_000, K, false, 3),
            s("medium", 32, 300, K * K, false, 3),
            s("concurrency", 2_000, 2_000, 64 * K, true, 1),
            s("active", 300, 600, K * K, false, 1),
        ],
        Preset::Smoke => vec![
            s("bulk", 1, 1, 16 * K * K, false, 1),
            s("small", 8, 200, K, false, 1),
            s("medium", 4, 20, K * K, false, 1),
            s("concurrency", 100, 100, 64 * K, true, 1),
            s("active", 20, 40, 256 * K, false, 1),
        ],
    }
}

/// Warm-up version of a scenario: same shape, a fraction of the work.
pub fn warm_up(s: &Scenario) -> Scenario {
    let mut w = s.clone();
    if s.all_at_once {
        w.clients = (s.clients / 4).max(1);
        w.transfers = w.clients as u64;
    } else if s.transfers == 1 {
        w.size = (s.size / 4).max(1);
    } else {
        w.transfers = (s.transfers / 5).max(1);
    }
    w
}

pub fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}
