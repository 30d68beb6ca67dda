//! The summary of `cargo xtask vm-test`: a row per machine, checks × machines, the failures,
//! and the struct offsets that differ between kernels (the host's included).
use super::Kernel;
use super::protocol::Run;

pub(super) fn verdict(run: &Run) -> &'static str {
    if run.timed_out {
        "TIMEOUT"
    } else if run.ok() {
        "PASS"
    } else {
        "FAIL"
    }
}

pub(super) fn print(
    machines: &[(String, &Kernel)],
    runs: &[Run],
    host: Option<&(String, Vec<(String, String)>)>,
) {
    println!();
    println!("xtask: vm-test summary");
    println!(
        "{:<28} {:<20} {:>7} {:>8} {:>7} {:>8}  socket tracepoints",
        "kernel", "package version", "boot", "total", "checks", "result"
    );
    for ((label, k), r) in machines.iter().zip(runs) {
        println!(
            "{:<28} {:<20} {:>7} {:>7.1}s {:>7} {:>8}  {}",
            label,
            k.version,
            r.boot.map_or("-".into(), |b| format!("{b:.1}s")),
            r.total,
            format!("{}/{}", r.passed(), r.checks.len()),
            verdict(r),
            r.sock_tracepoints.as_deref().unwrap_or("?")
        );
    }

    // Checks × kernels.
    let mut names: Vec<&str> = Vec::new();
    for r in runs {
        for (name, _, _) in &r.checks {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    let short = |label: &str| label.replace("-cloud-amd64", "");
    println!();
    print!("{:<26}", "check");
    for (label, _) in machines {
        print!(" {:<18}", short(label));
    }
    println!();
    for name in &names {
        print!("{name:<26}");
        for r in runs {
            let cell = r
                .checks
                .iter()
                .find(|c| c.0 == *name)
                .map_or("-", |c| if c.1 { "PASS" } else { "FAIL" });
            print!(" {cell:<18}");
        }
        println!();
    }
    for ((label, _), r) in machines.iter().zip(runs) {
        for (name, passed, detail) in &r.checks {
            if !passed {
                println!("  {} {name}: {detail}", short(label));
            }
        }
        for e in r.errors.iter().take(20) {
            println!("  {} error: {e}", short(label));
        }
    }

    // Offsets that differ between the kernels (and the host).
    let mut columns: Vec<(String, &Vec<(String, String)>)> = Vec::new();
    if let Some((release, offsets)) = host {
        columns.push((format!("host {release}"), offsets));
    }
    for ((label, _), r) in machines.iter().zip(runs) {
        if !r.offsets.is_empty() {
            columns.push((short(label), &r.offsets));
        }
    }
    if columns.len() > 1 {
        let fields: Vec<&String> = columns[0].1.iter().map(|(k, _)| k).collect();
        let value = |offsets: &Vec<(String, String)>, f: &str| {
            offsets
                .iter()
                .find(|(k, _)| k == f)
                .map_or("-".to_owned(), |(_, v)| v.clone())
        };
        let differing: Vec<&&String> = fields
            .iter()
            .filter(|f| {
                let first = value(columns[0].1, f);
                columns.iter().any(|(_, o)| value(o, f) != first)
            })
            .collect();
        println!();
        println!(
            "offsets that differ ({} of {} fields):",
            differing.len(),
            fields.len()
        );
        print!("{:<28}", "field");
        for (name, _) in &columns {
            print!(" {name:<24}");
        }
        println!();
        for f in differing {
            print!("{f:<28}");
            for (_, o) in &columns {
                print!(" {:<24}", value(o, f));
            }
            println!();
        }
    }
    println!();
}
