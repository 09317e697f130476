use super::*;

#[test]
fn an_open_loop_run_has_rate_times_duration_slots() {
    let second = Duration::from_secs(1);
    assert_eq!(slots_within(2 * second, 3000.0), 6000);
    assert_eq!(slots_within(second / 10, 30.0), 3);
    assert_eq!(slots_within(second, 1.5), 2); // at 0 and 0.67 s
    assert_eq!(slots_within(Duration::ZERO, 500.0), 0);
    // Slot 6,000 of 3,000/s is due at 2 s exactly, not before: adding
    // a rounded 1/3000 s gap 6,000 times once fell 2 us short.
    let t0 = Instant::now();
    assert_eq!(slot_time((t0, 3000.0), 6000), t0 + 2 * second);
}

#[test]
fn wall_time_ends_with_the_last_transfer() {
    // The summary's wall time is the latest end any client reported,
    // not the moment the main thread's 50 ms progress poll noticed.
    let t0 = Instant::now();
    let (early, late) = (t0 + Duration::from_millis(3), t0 + Duration::from_millis(7));
    let mut total = Tally::new();
    for ended in [Some(late), None, Some(early)] {
        let mut part = Tally::new();
        part.ended = ended;
        total.merge(part);
    }
    assert_eq!(total.ended, Some(late));
}
