//! The local socket's request line → `reaper::ipc::Request::parse`, as the daemon reads it: at
//! most 64 bytes, up to the first newline, UTF-8 or nothing (the socket is root's only, but a
//! request must never panic the daemon, and a request it accepts must mean what it says).
#![no_main]

use libfuzzer_sys::fuzz_target;
use reaper::ipc::Request;

fuzz_target!(|data: &[u8]| {
    // `read_line` on `take(64)`: up to and including the first '\n', 64 bytes at most; a line
    // that is not UTF-8 is an error before any parsing.
    let data = &data[..data.len().min(64)];
    let data = match data.iter().position(|b| *b == b'\n') {
        Some(end) => &data[..=end],
        None => data,
    };
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match Request::parse(line) {
        Ok(request) => {
            // The client's own line for it parses to the same request, and says the same words.
            let wire = request.line();
            assert_eq!(Request::parse(&wire), Ok(request), "{wire:?}");
            let words: Vec<&str> = line.split_whitespace().collect();
            let wire_words: Vec<&str> = wire.split_whitespace().collect();
            assert_eq!(words[0], wire_words[0], "{line:?}");
            assert_eq!(words.len(), wire_words.len(), "{line:?}");
            if let Request::Explain(pid) = request {
                assert_eq!(words[1].parse::<u32>(), Ok(pid), "{line:?}");
            }
        }
        Err(unknown) => {
            assert_eq!(unknown.0, line.trim());
            // The daemon answers it with a JSON error document.
            let answer = serde_json::json!({ "error": unknown.to_string() });
            let text = serde_json::to_string(&answer).expect("serialises");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&text).unwrap(),
                answer
            );
        }
    }
});
