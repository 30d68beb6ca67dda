//! What a process controls about itself: its argv (`/proc/PID/cmdline`, exec records), its
//! comm and its executable's path, and its parent's comm. Through `reaper::events::Argv`, the
//! rule matcher (`reaper::detect::targets::matches`) with the built-in rule and a parent rule, and
//! the `reaper tree` / `reaper explain` renderings: no panic, and a match really is a match.
//!
//! Input: fields separated by 0x1e (record separator): comm, exe, argv (NUL-separated, as in
//! cmdline), parent comm, tty byte (`0`: no terminal). Missing fields are empty.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use reaper::{
    config::{Config, Overrides, parse},
    detect::{Explanation, RuleCheck, targets},
    events::{Argv, Identity},
    render,
    tree::Process,
};

fn configs() -> &'static [Config; 2] {
    static CONFIGS: std::sync::OnceLock<[Config; 2]> = std::sync::OnceLock::new();
    CONFIGS.get_or_init(|| {
        let with_parent = parse(
            "[[rule]]\nname = \"p\"\ncomm = [\"claude\"]\nargv_any = [\"--input-format=stream-json\"]\nparent_comm = [\"node\", \"bun\"]\n",
            "fuzz",
            &Overrides::default(),
        )
        .expect("valid");
        [Config::builtin(), with_parent]
    })
}

fn process(pid: u32, ppid: u32, comm: &[u8], exe: &[u8], argv: &[u8]) -> Process {
    Process {
        id: Identity {
            pid,
            start_ticks: 7,
        },
        ppid,
        uid: 1000,
        comm: String::from_utf8_lossy(comm).into_owned(),
        exe: String::from_utf8_lossy(exe).into_owned(),
        argv: Argv::new(argv.to_vec()),
        argv_truncated: false,
        children: BTreeSet::new(),
        exit: None,
        placeholder: false,
        inherited_image: false,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut fields = data.split(|b| *b == 0x1e);
    let mut next = || fields.next().unwrap_or_default();
    let (comm, exe, raw, parent_comm, tty) = (next(), next(), next(), next(), next());
    let tty_nr = tty.first().map(|b| i32::from(*b));

    // argv: the arguments are the NUL-separated pieces, one trailing NUL dropped.
    let argv = Argv::new(raw.to_vec());
    let pieces: Vec<&[u8]> = argv.iter().collect();
    let body = raw.strip_suffix(&[0]).unwrap_or(raw);
    assert_eq!(
        pieces.join(&0u8),
        body,
        "argv pieces rejoin to the raw bytes"
    );
    assert_eq!(argv.to_strings().len(), pieces.len());
    let _ = (
        argv.to_string(),
        format!("{argv:?}"),
        serde_json::to_string(&argv).unwrap(),
    );

    let parent = process(41, 1, parent_comm, b"/usr/bin/node", b"node\0sdk.js\0");
    let p = process(42, 41, comm, exe, raw);
    for config in configs() {
        for rule in &config.rules {
            let result = targets::matches(rule, &p, Some(&parent), || tty_nr);
            if result.is_ok() {
                let base = p.exe.rsplit('/').next().unwrap_or_default();
                assert!(rule.comm.iter().any(|c| *c == p.comm || c == base), "{p:?}");
                assert_eq!(tty_nr, Some(0));
                assert!(
                    pieces
                        .iter()
                        .any(|a| a.starts_with(b"--input-format")
                            || a.starts_with(b"--output-format")),
                    "matched without a stream-json flag: {pieces:?}"
                );
                if !rule.parent_comm.is_empty() {
                    assert!(rule.parent_comm.contains(&parent.comm));
                }
            }
            let why_not = result.err().map(|m| m.to_string());
            let explanation = Explanation {
                pid: p.id.pid,
                process: Some(p.clone()),
                rules: vec![RuleCheck {
                    rule: rule.name.clone(),
                    matches: why_not.is_none(),
                    why_not,
                }],
                target: None,
                first_step: None,
                session: None,
                attribution: None,
                descendant_of: None,
            };
            let _ = render::render_explanation(&explanation);
        }
    }
    let _ = render::render_tree(&[parent, p], &[]);
});
