//! An upload's life through a synchronous `Disk` (each operation done
//! when asked, its completion reaped next), without a socket.

use super::*;

/// Hands every completion of `disk` (the synchronous one: each
/// operation is done when asked) to `upload`, until none is left.
fn settle(upload: &mut Upload, store: &mut Store, disk: &mut Disk) {
    while disk.has_completions() {
        for done in disk.reap() {
            upload.on_done(done, store, disk);
        }
    }
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn an_upload_is_created_written_synced_and_named_through_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut disk = Disk::blocking(4 * crate::event_loop::disk::CHUNK);
    let owner = Owner { key: 3, id: 7 };
    let mut upload = Upload::create(&mut store, &mut disk, owner, true);
    assert!(
        upload.room(&mut disk).is_none(),
        "nothing is read before the file exists"
    );
    settle(&mut upload, &mut store, &mut disk);
    let data: Vec<u8> = (0..(5 << 20) + 12_345)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let mut sent = 0;
    while sent < data.len() {
        let room = upload
            .room(&mut disk)
            .expect("room: writes complete at once");
        let n = room.len().min(100_000).min(data.len() - sent);
        room[..n].copy_from_slice(&data[sent..sent + n]);
        upload.commit(n, &mut disk);
        sent += n;
        settle(&mut upload, &mut store, &mut disk);
    }
    upload.eof(&mut disk);
    let ended = loop {
        settle(&mut upload, &mut store, &mut disk);
        if let Some(ended) = upload.advance_to_end(&mut disk) {
            break ended;
        }
    };
    assert!(ended.is_ok(), "{ended:?}");
    assert_eq!(upload.bytes(), data.len() as u64);
    assert_eq!(upload.crc32c(), crc32c::crc32c(&data));
    let name = upload.name().to_string();
    upload.close(&mut disk);
    assert_eq!(names(dir.path()), vec![name.clone()]);
    let path = dir.path().join(&name);
    assert_eq!(std::fs::read(&path).unwrap(), data);
    // The reservation ahead was given back.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(allocated <= data.len() as u64 + 64 * 1024, "{allocated}");
}

#[test]
fn an_abandoned_upload_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut disk = Disk::blocking(4 * crate::event_loop::disk::CHUNK);
    let owner = Owner { key: 0, id: 1 };
    let mut upload = Upload::create(&mut store, &mut disk, owner, false);
    settle(&mut upload, &mut store, &mut disk);
    let room = upload.room(&mut disk).unwrap();
    room[..5].copy_from_slice(b"half ");
    upload.commit(5, &mut disk);
    upload.flush(&mut disk);
    assert_eq!(names(dir.path()).len(), 1, "the .part is there");
    upload.abandon(&mut disk);
    let _ = disk.reap();
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
}
