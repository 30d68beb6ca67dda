//! `cargo xtask vm-test`: the lifecycle and reaping checks on other kernels, in QEMU.
//!
//! The host kernel runs the full suite natively (`cargo xtask test`); this boots Debian's packaged
//! cloud kernels (one per series the configured archive has: 6.1 and 6.12 on bookworm) by
//! software emulation, with an initramfs whose `/init` is `vm-runner` (tests/src/bin/vm_runner.rs),
//! and reports per kernel and per check.
//!
//! One module per step:
//!
//! 1. Kernels ([`kernels`]): `apt-cache search` for `linux-image-*-cloud-amd64-unsigned`, the newest of each
//!    series the configured archive has, plus the 5.x series of Debian 11 (bullseye), read
//!    through a private apt state in `target/vm/apt-debian11/` (the host's apt configuration is
//!    not touched); `apt-get download` + `dpkg-deb -x`, keeping `boot/` in
//!    `target/vm/kernels/<package>/` (skipped when present: nothing is downloaded twice). A
//!    package the mirror no longer serves is replaced by the next older one of its series.
//! 2. Binaries ([`initramfs`]): `vm-runner`, `lifecycle-helper`, `claude`, `fake-agent` built statically
//!    (`+crt-static`, `--target x86_64-unknown-linux-gnu`, only the target artifacts: the build
//!    scripts and aya-build's nested eBPF build are untouched) into `target/vm-build`, so the
//!    normal build cache is not invalidated. `file` must say they are statically linked.
//! 3. Initramfs ([`initramfs`]): an uncompressed newc cpio written here (`target/vm/initramfs.cpio`):
//!    `/init`, `/bin/*`, `/dev/console`.
//! 4. QEMU per kernel ([`qemu`]), with a wall-clock limit; the console goes to
//!    `target/vm/<kernel release>.log`; `vm-check` lines are parsed ([`protocol`]); a table per kernel and
//!    per check ([`report`]), and the struct offsets that differ between kernels (the host's included).
//! 5. The systemd machine ([`systemd`]): the .deb of `cargo xtask dist` installed, its
//!    `reaper.service` run by a real systemd, then removed.
use std::fs;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;

use crate::Ctx;

mod apt;
mod initramfs;
mod kernels;
mod protocol;
mod qemu;
mod report;
mod systemd;

pub(crate) use apt::ensure_tool;
pub(crate) use initramfs::{build_static, static_dir};
use kernels::Kernel;
use protocol::Run;
use qemu::Machine;

#[derive(Debug, clap::Args)]
pub(crate) struct Opts {
    /// Boot only this kernel series (repeatable), e.g. `--kernel 6.1`. Default: the newest
    /// cloud kernel of every series the configured Debian archive has.
    #[arg(long = "kernel", value_name = "SERIES")]
    kernels: Vec<String>,

    /// Wall-clock limit per kernel, in seconds (software emulation is slow).
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    timeout: u64,

    /// Show the whole console of each machine, not only the check lines.
    #[arg(long)]
    verbose: bool,

    /// `NAME=VALUE` for the runner's environment (repeatable; the kernel hands command-line
    /// words of that form to init), e.g. `RUST_LOG=debug` or `VM_HANG_CHECK=rename`.
    #[arg(long, value_name = "NAME=VALUE")]
    guest_env: Vec<String>,

    /// Skip the systemd machine (deploy/reaper.service under a real systemd, booted on the
    /// newest kernel of the matrix).
    #[arg(long)]
    no_systemd: bool,
}

impl Default for Opts {
    /// What `cargo xtask test` runs: every kernel, the default limit.
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            timeout: 600,
            verbose: false,
            guest_env: Vec::new(),
            no_systemd: false,
        }
    }
}

/// Checks passed and failed over every kernel (a machine that did not finish counts as one
/// more failure).
pub(crate) struct Outcome {
    pub(crate) passed: u64,
    pub(crate) failed: u64,
}

impl Outcome {
    pub(crate) fn exit_code(&self) -> ExitCode {
        if self.failed == 0 && self.passed > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn run(ctx: &Ctx, opts: &Opts) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let vm_dir = ctx.target_dir.join("vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
    ensure_tool("file", "file")?;

    let series = kernels::choose(&vm_dir, &opts.kernels)?;
    let mut kernels = Vec::new();
    for candidates in &series {
        kernels.push(kernels::fetch_series(&vm_dir, candidates)?);
    }

    let bins = build_static(ctx)?;
    let initramfs = vm_dir.join("initramfs.cpio");
    initramfs::write(&initramfs, &bins)?;
    println!(
        "xtask: initramfs {} ({:.1} MB)",
        initramfs.display(),
        fs::metadata(&initramfs)?.len() as f64 / 1e6
    );

    // The host's layout, for comparison.
    let host = protocol::host_layout(&bins[0]);

    let mut runs = Vec::new();
    for kernel in &kernels {
        println!(
            "xtask: booting {} ({} {}) in QEMU (software emulation, limit {}s)",
            kernel.release, kernel.package, kernel.version, opts.timeout
        );
        let run = qemu::boot(
            &vm_dir,
            kernel,
            &initramfs,
            opts,
            &Machine::matrix(kernel, opts),
        )?;
        println!(
            "xtask: {}: {} in {:.1}s (boot {}), log {}",
            kernel.release,
            report::verdict(&run),
            run.total,
            run.boot.map_or("-".into(), |b| format!("{b:.1}s")),
            run.log.display()
        );
        runs.push(run);
    }

    let mut machines: Vec<(String, &Kernel)> =
        kernels.iter().map(|k| (k.release.clone(), k)).collect();
    if !opts.no_systemd {
        let kernel = kernels.last().context("no kernel to boot")?;
        let static_dir = static_dir(ctx);
        // A machine that cannot be prepared (no network for debootstrap, say) is one failure
        // in the summary, not the end of the run. It installs the .deb of `cargo xtask dist`
        // (packaging the static build above: seconds).
        let prepared = crate::dist::run(ctx)
            .and_then(|artifacts| systemd::run(&vm_dir, kernel, opts, &static_dir, &artifacts.deb));
        let run = prepared.unwrap_or_else(|err| {
            println!("xtask: the systemd machine could not be prepared: {err:#}");
            Run {
                errors: vec![format!("not booted: {err:#}")],
                log: vm_dir.join("systemd"),
                ..Run::default()
            }
        });
        runs.push(run);
        machines.push((format!("{} + systemd", kernel.release), kernel));
    }

    report::print(&machines, &runs, host.as_ref());
    let passed: usize = runs.iter().map(Run::passed).sum();
    // A machine that did not finish counts as one more failure.
    let failed: usize = runs
        .iter()
        .map(|r| r.failed() + usize::from(r.timed_out || r.result.is_none()))
        .sum();
    println!(
        "xtask: vm-test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    println!("xtask: vm-test: {passed} passed, {failed} failed");
    let all_ok = runs.iter().all(Run::ok);
    Ok(Outcome {
        passed: passed as u64,
        // A run that is not ok without a failing check (no result line) still fails.
        failed: (failed as u64).max(u64::from(!all_ok)),
    })
}
