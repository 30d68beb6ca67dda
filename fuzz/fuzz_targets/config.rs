//! Configuration text → `reaper::config::parse`. A file only root can write, but a typo or a
//! truncated write must be refused with a message, never a panic, and anything accepted must
//! hold the invariants the daemon relies on.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use reaper::{
    config::{Mode, Overrides, parse},
    detect::{ActivityMeter, Detector},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let flags = Overrides {
        idle_timeout: Some(Duration::from_secs(90)),
        grace: Some(Duration::from_millis(1)),
        dry_run: true,
        metrics_addr: Some(([127, 0, 0, 1], 1).into()),
    };
    for overrides in [Overrides::default(), flags] {
        let config = match parse(text, "fuzz.toml", &overrides) {
            Ok(config) => config,
            Err(err) => {
                let message = err.to_string();
                assert!(message.starts_with("config fuzz.toml"), "{message}");
                continue;
            }
        };
        assert!(!config.rules.is_empty());
        assert!(config.ring_bytes.is_power_of_two() && config.ring_bytes >= 4096);
        assert!(config.max_kills_per_minute >= 1);
        assert!(!config.grace.is_zero() && !config.reconcile_interval.is_zero());
        for (i, rule) in config.rules.iter().enumerate() {
            assert!(!rule.name.trim().is_empty());
            assert!(
                config.rules[..i].iter().all(|r| r.name != rule.name),
                "unique names"
            );
            assert!(!rule.comm.is_empty());
            assert!(rule.comm.iter().all(|c| !c.is_empty() && !c.contains('/')));
            assert!(rule.argv_any.iter().all(|a| !a.trim().is_empty()));
            assert!(!rule.idle_timeout.is_zero());
            assert!(rule.cpu_threshold.is_finite() && rule.cpu_threshold > 0.0);
        }
        if overrides.dry_run {
            assert_eq!(config.mode, Mode::DryRun);
            assert!(
                config
                    .rules
                    .iter()
                    .all(|r| r.idle_timeout == Duration::from_secs(90))
            );
        }
        let _ = serde_json::to_string(&config).expect("a config serialises");
        // What the daemon builds from it.
        let mut detector = Detector::new(&config, ActivityMeter::ProcIo);
        assert_eq!(detector.target_count(), 0);
        assert_eq!(detector.next_wakeup(0), None);
    }
});
