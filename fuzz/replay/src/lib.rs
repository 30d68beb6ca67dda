//! A stand-in for `libfuzzer-sys` that turns each fuzz target into a test program: its
//! [`fuzz_target!`] expands to a `main` that feeds the target every file of its committed corpus
//! (`fuzz/corpus/<target>`), then inputs mutated from them for a few seconds
//! (`REAPER_FUZZ_SECONDS`, default 3), without coverage guidance. A panic is a failure: the input
//! is written to `<target dir>/fuzz-replay/<target>/crash-<n>` and named in the output, which
//! ends with a libtest-style `test result:` line so `cargo xtask test` counts it. Name filters
//! work as with libtest: the test is called `fuzz_target::<target>`.
//!
//! This is not fuzzing in libFuzzer's sense; it keeps the targets compiling against today's code
//! and their corpus passing, and finds shallow bugs. `cargo xtask fuzz` runs the same targets
//! under libFuzzer.
use std::{
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use arbitrary;

/// libFuzzer's `-max_len` as `cargo xtask fuzz` sets it (exec records are 4,416 bytes).
const MAX_LEN: usize = 8192;

/// libfuzzer-sys's `fuzz_target!` forms that reaper's targets use: raw bytes, or a type built
/// from them with `arbitrary`.
#[macro_export]
macro_rules! fuzz_target {
    (|$bytes:ident| $body:expr) => {
        $crate::fuzz_target!(|$bytes: &[u8]| $body);
    };
    (|$data:ident: &[u8]| $body:expr) => {
        fn __reaper_fuzz_run($data: &[u8]) {
            $body
        }
        /// The program's entry point: the crate is `#![no_main]`, as libFuzzer's are.
        #[unsafe(no_mangle)]
        pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
            $crate::replay(env!("CARGO_CRATE_NAME"), __reaper_fuzz_run)
        }
    };
    (|$data:ident: $dty:ty| $body:expr) => {
        fn __reaper_fuzz_typed($data: $dty) {
            $body
        }
        fn __reaper_fuzz_run(bytes: &[u8]) {
            use $crate::arbitrary::{Arbitrary as _, Unstructured};
            // As libfuzzer-sys does: inputs that do not make a value are skipped.
            if let Ok(data) = <$dty>::arbitrary_take_rest(Unstructured::new(bytes)) {
                __reaper_fuzz_typed(data);
            }
        }
        /// The program's entry point: the crate is `#![no_main]`, as libFuzzer's are.
        #[unsafe(no_mangle)]
        pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
            $crate::replay(env!("CARGO_CRATE_NAME"), __reaper_fuzz_run)
        }
    };
}

/// The committed corpus of `target`.
fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target)
}

/// Every file of the corpus, sorted by name.
fn corpus(target: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path()).map_err(|e| format!("{name}: {e}"))?;
        files.push((name, bytes));
    }
    files.sort();
    if files.is_empty() {
        return Err(format!(
            "{} is empty: commit a few seed inputs",
            dir.display()
        ));
    }
    Ok(files)
}

/// xorshift64*: mutations need speed and a seed to print, not quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that tend to matter to parsers: separators, bounds, and the characters the
/// escaping code must catch.
const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\n",
    b" ",
    b"(",
    b")",
    b") ",
    b"=",
    b"\"",
    b"\\",
    b"\x1b[",
    b"\x1e",
    b"\xff",
    "\u{202e}".as_bytes(),
    "\u{200b}".as_bytes(),
    b"4294967296",
    b"-1",
    b"0",
];

/// One input derived from `seed` (and `other`, for splicing).
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(8) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            2 => data.insert(at, rng.next() as u8),
            3 if !data.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at.min(data.len() - 1)..end);
            }
            4 => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                data.splice(at..at, piece.iter().copied());
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let len = rng.below(other.len() - from) + 1;
                data.splice(at..at, other[from..from + len].iter().copied());
            }
            6 => data.truncate(at),
            _ => {
                let end = (at + rng.below(8)).min(data.len());
                let chunk = data[at..end].to_vec();
                data.splice(at..at, chunk);
            }
        }
    }
    data.truncate(MAX_LEN);
    data
}

/// Where crash inputs go: `<target dir>/fuzz-replay/<target>`.
fn crash_dir(target: &str) -> PathBuf {
    // The test program runs from <target dir>/<profile>/deps/.
    let exe = std::env::current_exe().unwrap_or_default();
    let base = exe
        .ancestors()
        .nth(3)
        .map_or_else(std::env::temp_dir, Path::to_path_buf);
    base.join("fuzz-replay").join(target)
}

/// Runs `run` on the corpus of `target`, then on mutations of it until the time budget is
/// spent. Returns the process exit code; prints a libtest-style summary.
pub fn replay(target: &str, run: fn(&[u8])) -> i32 {
    let started = Instant::now();
    let budget = std::env::var("REAPER_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(3), Duration::from_secs_f64);
    let seed = std::env::var("REAPER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let name = format!("fuzz_target::{target}");
    match selected(&name, std::env::args().skip(1)) {
        Selection::List => {
            println!("{name}: test");
            return 0;
        }
        Selection::FilteredOut => {
            println!(
                "\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out; finished in 0.00s\n"
            );
            return 0;
        }
        Selection::Run => {}
    }
    println!("\nrunning 1 test");
    let corpus = match corpus(target) {
        Ok(corpus) => corpus,
        Err(err) => return finish(target, started, Err(err)),
    };
    // Quiet panics: the failure is reported below, with its input.
    std::panic::set_hook(Box::new(|info| eprintln!("{info}")));
    let attempt = |what: &str, input: &[u8]| -> Result<(), String> {
        std::panic::catch_unwind(AssertUnwindSafe(|| run(input))).map_err(|_| {
            let dir = crash_dir(target);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("crash-{seed}"));
            let _ = std::fs::write(&path, input);
            format!(
                "{what} panicked; input saved to {} (reproduce: REAPER_FUZZ_SEED={seed}, or \
                 copy it into fuzz/corpus/{target}/)",
                path.display()
            )
        })
    };
    for (name, input) in &corpus {
        if let Err(err) = attempt(&format!("corpus input {name}"), input) {
            return finish(target, started, Err(err));
        }
    }
    let mut rng = Rng(seed);
    let mut runs = 0u64;
    while started.elapsed() < budget {
        let (_, a) = &corpus[rng.below(corpus.len())];
        let (_, b) = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, a, b);
        if let Err(err) = attempt(
            &format!("a mutated input (run {runs}, seed {seed})"),
            &input,
        ) {
            return finish(target, started, Err(err));
        }
        runs += 1;
    }
    finish(
        target,
        started,
        Ok(format!(
            "{} corpus inputs, {runs} mutated inputs (seed {seed})",
            corpus.len()
        )),
    )
}

enum Selection {
    Run,
    FilteredOut,
    List,
}

/// What libtest would do with `name` given these arguments (`cargo xtask test -- FILTER` passes
/// them to every test program): name filters (substrings, or whole names with `--exact`),
/// `--skip FILTER`, `--list`. Other options (`--test-threads=1`, `--nocapture`) do not matter
/// here.
fn selected(name: &str, args: impl Iterator<Item = String>) -> Selection {
    let (mut filters, mut skips, mut exact, mut list) = (Vec::new(), Vec::new(), false, false);
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--exact" => exact = true,
            "--list" => list = true,
            "--skip" => skips.extend(args.next()),
            // Options with a separate value.
            "--test-threads" | "--format" | "--color" | "--logfile" | "-Z" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            _ => filters.push(arg),
        }
    }
    let matches = |f: &String| {
        if exact {
            name == f
        } else {
            name.contains(f.as_str())
        }
    };
    if (!filters.is_empty() && !filters.iter().any(matches))
        || skips.iter().any(|s| name.contains(s.as_str()))
    {
        Selection::FilteredOut
    } else if list {
        Selection::List
    } else {
        Selection::Run
    }
}

fn finish(target: &str, started: Instant, outcome: Result<String, String>) -> i32 {
    let secs = started.elapsed().as_secs_f64();
    match outcome {
        Ok(what) => {
            println!("test fuzz_target::{target} ... ok ({what})");
            println!(
                "\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s\n"
            );
            0
        }
        Err(err) => {
            println!("test fuzz_target::{target} ... FAILED\n{err}");
            println!(
                "\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s\n"
            );
            101
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[[name]]` sections' `name = "…"` values of a Cargo.toml.
    fn declared(manifest: &str, section: &str) -> Vec<String> {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(manifest)).unwrap();
        let mut names = Vec::new();
        let mut inside = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                inside = line == format!("[[{section}]]");
            } else if inside && let Some(name) = line.strip_prefix("name = ") {
                names.push(name.trim_matches('"').to_owned());
            }
        }
        names.sort();
        names
    }

    /// Every target file is replayed here and built by cargo-fuzz, and every one has a corpus.
    #[test]
    fn every_fuzz_target_is_declared_twice_and_has_a_corpus() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz_targets");
        let mut targets: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".rs")
                    .map(str::to_owned)
            })
            .collect();
        targets.sort();
        assert!(targets.len() >= 6, "{targets:?}");
        assert_eq!(
            declared("Cargo.toml", "test"),
            targets,
            "fuzz/replay/Cargo.toml's [[test]]s"
        );
        assert_eq!(
            declared("../Cargo.toml", "bin"),
            targets,
            "fuzz/Cargo.toml's [[bin]]s"
        );
        for t in &targets {
            assert!(corpus(t).is_ok(), "{t}: {:?}", corpus(t).err());
        }
    }

    #[test]
    fn name_filters_work_as_in_libtest() {
        let sel =
            |args: &[&str]| selected("fuzz_target::decode", args.iter().map(|a| (*a).to_owned()));
        assert!(matches!(sel(&[]), Selection::Run));
        assert!(matches!(
            sel(&["--test-threads=1", "--nocapture"]),
            Selection::Run
        ));
        assert!(matches!(sel(&["--test-threads", "1"]), Selection::Run));
        assert!(matches!(sel(&["tree_"]), Selection::FilteredOut));
        assert!(matches!(sel(&["tree_", "decode"]), Selection::Run));
        assert!(matches!(sel(&["fuzz_target"]), Selection::Run));
        assert!(matches!(
            sel(&["decode", "--exact"]),
            Selection::FilteredOut
        ));
        assert!(matches!(
            sel(&["--exact", "fuzz_target::decode"]),
            Selection::Run
        ));
        assert!(matches!(sel(&["--skip", "fuzz"]), Selection::FilteredOut));
        assert!(matches!(sel(&["--list"]), Selection::List));
        assert!(matches!(sel(&["--list", "tree_"]), Selection::FilteredOut));
    }

    #[test]
    fn mutations_stay_within_the_length_limit_and_vary() {
        let mut rng = Rng(7);
        let seed = vec![b'x'; MAX_LEN];
        let outputs: Vec<Vec<u8>> = (0..200)
            .map(|_| mutate(&mut rng, &seed, b"tree\n"))
            .collect();
        assert!(outputs.iter().all(|o| o.len() <= MAX_LEN));
        assert!(outputs.iter().any(|o| *o != seed));
        assert!(mutate(&mut rng, b"", b"").len() <= 16);
    }
}
