//! Ring buffer records → `reaper::events::decode`. Records come from the kernel, but the
//! decoder treats them as untrusted bytes: any input must give an event or an error, never a
//! panic, and a decoded event must respect the bounds of the arrays it came from.
#![no_main]

use std::mem::size_of;

use libfuzzer_sys::fuzz_target;
use reaper::events::{Event, decode};
use reaper_common::{
    ARGV_LEN, COMM_LEN, EventKind, ExecEvent, ExitEvent, FILENAME_LEN, ForkEvent, RenameEvent,
};

fuzz_target!(|data: &[u8]| {
    // As is: any length, any kind id.
    check(data);
    // Shaped: the first byte picks a kind, the rest fills a record of exactly that kind's size
    // (zero-padded), so every field decoder is reached, not just the length checks.
    if let Some((&pick, rest)) = data.split_first() {
        let kind = EventKind::ALL[usize::from(pick) % EventKind::ALL.len()];
        let size = match kind {
            EventKind::Fork => size_of::<ForkEvent>(),
            EventKind::Exec => size_of::<ExecEvent>(),
            EventKind::Exit => size_of::<ExitEvent>(),
            EventKind::Rename => size_of::<RenameEvent>(),
        };
        let mut record = vec![0u8; size];
        let n = rest.len().min(size);
        record[..n].copy_from_slice(&rest[..n]);
        record[..4].copy_from_slice(&(kind as u32).to_ne_bytes());
        assert!(
            check(&record) || kind == EventKind::Exec,
            "a {kind:?} record of the right size never fails to decode"
        );
    }
});

/// Decodes `bytes`; on success checks the event's bounds and that it prints and serialises.
fn check(bytes: &[u8]) -> bool {
    let Ok(event) = decode(bytes) else {
        return false;
    };
    // A replaced invalid byte is one char: char counts are bounded by the byte arrays.
    match &event {
        Event::Fork { comm, .. } | Event::Rename { comm, .. } => {
            assert!(comm.chars().count() <= COMM_LEN, "{comm:?}");
        }
        Event::Exec {
            comm,
            filename,
            argv,
            ..
        } => {
            assert!(comm.chars().count() <= COMM_LEN, "{comm:?}");
            assert!(
                filename
                    .as_ref()
                    .is_none_or(|f| f.chars().count() <= FILENAME_LEN)
            );
            assert!(argv.raw().len() <= ARGV_LEN);
            assert_eq!(argv.iter().count(), argv.to_strings().len());
        }
        Event::Exit { status, .. } => {
            let _ = (
                status.code(),
                status.signal(),
                status.core_dumped(),
                status.to_string(),
            );
        }
    }
    let _ = event.to_string();
    let _ = serde_json::to_string(&event).expect("an event serialises");
    true
}
