//! One machine in QEMU: boot a kernel with an initramfs, follow its console into a log until it
//! powers off or its wall-clock limit passes.
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::protocol::{Run, strip_escapes};
use super::{Kernel, Opts};
use crate::cmd::describe;

/// How one machine is started: the kernel matrix's (vm-runner as init) or the systemd one.
pub(crate) struct Machine {
    /// Names its console log (`target/vm/<label>.log`) and prefixes its lines.
    pub(crate) label: String,
    pub(crate) memory_mb: u32,
    /// Kernel command-line words after the common ones.
    pub(crate) append: String,
    /// The console line that marks the end of boot (the guest's first own line).
    pub(crate) ready_marker: &'static str,
}

impl Machine {
    pub(super) fn matrix(kernel: &Kernel, opts: &Opts) -> Self {
        // The guest's own watchdog ends it a little before ours kills QEMU.
        let guest_deadline = opts.timeout.saturating_sub(30).max(60);
        Self {
            label: kernel.release.clone(),
            memory_mb: 1024,
            append: format!(
                "VM_DEADLINE_SECS={guest_deadline} {}",
                opts.guest_env.join(" ")
            ),
            ready_marker: "vm-runner: started",
        }
    }
}

/// Boots one kernel and follows its console until it powers off or the limit passes.
pub(crate) fn boot(
    vm_dir: &Path,
    kernel: &Kernel,
    initramfs: &Path,
    opts: &Opts,
    machine: &Machine,
) -> anyhow::Result<Run> {
    let log_path = vm_dir.join(format!("{}.log", machine.label));
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.arg("-m")
        .arg(machine.memory_mb.to_string())
        .args(["-smp", "2", "-nographic", "-no-reboot", "-kernel"])
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {}", machine.append))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    writeln!(log, "# {}", describe(&cmd))?;
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", describe(&cmd)))?;
    let (tx, rx) = std::sync::mpsc::channel::<(bool, String)>();
    for (is_err, stream) in [
        (
            false,
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ),
        (
            true,
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ),
    ] {
        let Some(stream) = stream else { continue };
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_escapes(&String::from_utf8_lossy(&buf));
                        if tx.send((is_err, line)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(tx);
    let limit = Duration::from_secs(opts.timeout);
    let mut run = Run {
        log: log_path,
        ..Run::default()
    };
    let tag = machine.label.replace("-cloud-amd64", "");
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok((is_err, line)) => {
                let secs = started.elapsed().as_secs_f64();
                writeln!(
                    log,
                    "[{secs:8.3}] {}{line}",
                    if is_err { "qemu-stderr: " } else { "" }
                )?;
                if line.contains(machine.ready_marker) && run.boot.is_none() {
                    run.boot = Some(secs);
                }
                let interesting = run.record(&line, is_err);
                if interesting || opts.verbose {
                    println!("[{tag} {secs:6.1}s] {line}");
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                run.timed_out = true;
                println!(
                    "[{tag}] no power-off within {}s: killing QEMU",
                    opts.timeout
                );
                writeln!(log, "# killed after {}s", opts.timeout)?;
                let _ = child.kill();
                break;
            }
        }
    }
    let st = child.wait().context("waiting for QEMU")?;
    run.total = started.elapsed().as_secs_f64();
    writeln!(log, "# qemu exited: {st} after {:.1}s", run.total)?;
    if !st.success() && !run.timed_out {
        run.errors.push(format!("qemu exited with {st}"));
    }
    Ok(run)
}
