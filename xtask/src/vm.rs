//! `cargo xtask vm-test`: the lifecycle and reaping checks on other kernels, in QEMU.
//!
//! The host kernel runs the full suite natively (`cargo xtask test`); this boots Debian's packaged
//! cloud kernels (one per series the configured archive has: 6.1 and 6.12 on bookworm) by
//! software emulation, with an initramfs whose `/init` is `vm-runner` (tests/src/bin/vm_runner.rs),
//! and reports per kernel and per check.
//!
//! 1. Kernels: `apt-cache search` for `linux-image-*-cloud-amd64-unsigned`, the newest of each
//!    series the configured archive has, plus the 5.x series of Debian 11 (bullseye), read
//!    through a private apt state in `target/vm/apt-debian11/` (the host's apt configuration is
//!    not touched); `apt-get download` + `dpkg-deb -x`, keeping `boot/` in
//!    `target/vm/kernels/<package>/` (skipped when present: nothing is downloaded twice). A
//!    package the mirror no longer serves is replaced by the next older one of its series.
//! 2. Binaries: `vm-runner`, `lifecycle-helper`, `claude`, `fake-agent` built statically
//!    (`+crt-static`, `--target x86_64-unknown-linux-gnu`, only the target artifacts: the build
//!    scripts and aya-build's nested eBPF build are untouched) into `target/vm-build`, so the
//!    normal build cache is not invalidated. `file` must say they are statically linked.
//! 3. Initramfs: an uncompressed newc cpio written here (`target/vm/initramfs.cpio`):
//!    `/init`, `/bin/*`, `/dev/console`.
//! 4. QEMU per kernel, with a wall-clock limit; the console goes to
//!    `target/vm/<kernel release>.log`; `vm-check` lines are parsed; a table per kernel and per
//!    check, and the struct offsets that differ between kernels (the host's included).
//! 5. The systemd machine ([`systemd`]): the .deb of `cargo xtask dist` installed, its
//!    `reaper.service` run by a real systemd, then removed.
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::Ctx;
use crate::cmd::{describe, output, status};

mod systemd;

/// The programs the guest needs; the first is `/init`.
const PROGRAMS: [&str; 4] = ["vm-runner", "lifecycle-helper", "claude", "fake-agent"];
const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";
const PACKAGE_SUFFIX: &str = "-cloud-amd64-unsigned";

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

/// A Debian kernel package of the archive.
#[derive(Clone, Debug)]
struct KernelPackage {
    name: String,
    /// The numbers in its name: 6.1.0-56 → [6, 1, 0, 56]; 6.12.117+deb12 → [6, 12, 117, 12].
    numbers: Vec<u32>,
    /// `-o` options for apt-get to reach the archive that has it (none: the host's).
    apt_options: Vec<String>,
}

/// Debian 11's archive, for a 5.x kernel (5.10): BTF, ring buffers and BTF tracepoints, but
/// older layouts and verifier than anything bookworm packages.
const OLDER_ARCHIVE: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
";
/// Only these series are taken from [`OLDER_ARCHIVE`] (its 6.1 backports duplicate bookworm's).
const OLDER_SERIES_MAJOR: u32 = 5;

impl KernelPackage {
    fn from_name(name: &str) -> Option<Self> {
        let middle = name
            .strip_prefix("linux-image-")?
            .strip_suffix(PACKAGE_SUFFIX)?;
        let numbers: Vec<u32> = middle
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        (numbers.len() >= 2).then(|| Self {
            name: name.to_owned(),
            numbers,
            apt_options: Vec::new(),
        })
    }

    fn series(&self) -> String {
        format!("{}.{}", self.numbers[0], self.numbers[1])
    }
}

/// A kernel ready to boot.
#[derive(Debug)]
pub(crate) struct Kernel {
    package: String,
    version: String,
    release: String,
    vmlinuz: PathBuf,
}

/// What one machine reported.
#[derive(Debug, Default)]
pub(crate) struct Run {
    /// Wall seconds from starting QEMU to the runner's first line.
    boot: Option<f64>,
    total: f64,
    timed_out: bool,
    kernel_line: Option<String>,
    checks: Vec<(String, bool, String)>,
    result: Option<String>,
    offsets: Vec<(String, String)>,
    sock_tracepoints: Option<String>,
    errors: Vec<String>,
    log: PathBuf,
}

impl Run {
    fn passed(&self) -> usize {
        self.checks.iter().filter(|c| c.1).count()
    }
    fn failed(&self) -> usize {
        self.checks.iter().filter(|c| !c.1).count()
    }
    /// Every check passed and the runner finished, and its own count (`vm-result: N passed,
    /// M failed`) agrees with the check lines read: a line garbled on the console (kernel
    /// messages share it) cannot hide a failure.
    fn ok(&self) -> bool {
        let counted = self.result.as_deref().and_then(parse_result);
        !self.timed_out
            && counted == Some((self.passed(), self.failed()))
            && self.failed() == 0
            && self.passed() > 0
    }
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

    let series = choose_kernels(&vm_dir, &opts.kernels)?;
    let mut kernels = Vec::new();
    for candidates in &series {
        kernels.push(fetch_series(&vm_dir, candidates)?);
    }

    let bins = build_static(ctx)?;
    let initramfs = vm_dir.join("initramfs.cpio");
    write_initramfs(&initramfs, &bins)?;
    println!(
        "xtask: initramfs {} ({:.1} MB)",
        initramfs.display(),
        fs::metadata(&initramfs)?.len() as f64 / 1e6
    );

    // The host's layout, for comparison.
    let host = host_layout(&bins[0]);

    let mut runs = Vec::new();
    for kernel in &kernels {
        println!(
            "xtask: booting {} ({} {}) in QEMU (software emulation, limit {}s)",
            kernel.release, kernel.package, kernel.version, opts.timeout
        );
        let run = boot(&vm_dir, kernel, &initramfs, opts, &Machine::matrix(kernel, opts))?;
        println!(
            "xtask: {}: {} in {:.1}s (boot {}), log {}",
            kernel.release,
            verdict(&run),
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

    report(&machines, &runs, host.as_ref());
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

fn verdict(run: &Run) -> &'static str {
    if run.timed_out {
        "TIMEOUT"
    } else if run.ok() {
        "PASS"
    } else {
        "FAIL"
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    println!("xtask: {}", describe(&cmd));
    let st = status(&mut cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(&cmd));
    }
    Ok(())
}

/// Installs Debian `package` when `tool` is not on PATH (apt-get update first if needed).
pub(crate) fn ensure_tool(tool: &str, package: &str) -> anyhow::Result<()> {
    if which(tool).is_some() {
        return Ok(());
    }
    println!("xtask: {tool} not found; installing the Debian package {package}");
    if which("apt-get").is_none() {
        bail!("{tool} is missing and there is no apt-get: install {package} and run again");
    }
    let install = ["install", "-y", "--no-install-recommends", package];
    if apt_get(&install).is_err() {
        apt_get(&["update"])?;
        apt_get(&install)?;
    }
    if which(tool).is_none() {
        bail!("{package} is installed but {tool} is not on PATH");
    }
    Ok(())
}

/// The series a full matrix boots: Debian 11's 5.10, bookworm's 6.1 and 6.12.
const EXPECTED_SERIES: [&str; 3] = ["5.10", "6.1", "6.12"];

/// How old the host's newest apt list is (None: no lists).
fn apt_lists_age() -> Option<Duration> {
    fs::read_dir("/var/lib/apt/lists")
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("InRelease"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
        .and_then(|newest| newest.elapsed().ok())
}

/// The packages of each series (or of the series asked for), newest first: the host archive's,
/// and Debian 11's 5.x. Without apt's lists it runs `apt-get update` once; with no archive at
/// all it uses the kernels already downloaded.
fn choose_kernels(vm_dir: &Path, wanted: &[String]) -> anyhow::Result<Vec<Vec<KernelPackage>>> {
    let search = |apt_options: &[String]| -> anyhow::Result<Vec<KernelPackage>> {
        let mut cmd = Command::new("apt-cache");
        cmd.args(apt_options).args([
            "search",
            "--names-only",
            &format!("^linux-image-.*{PACKAGE_SUFFIX}$"),
        ]);
        let text = output(&mut cmd)?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(KernelPackage::from_name)
            .map(|p| KernelPackage {
                apt_options: apt_options.to_vec(),
                ..p
            })
            .collect())
    };
    // A machine image's apt lists can be months old and miss a whole series (bookworm's
    // 6.12 cloud kernels came with a point release): refresh them once a day.
    if which("apt-get").is_some() && apt_lists_age().is_none_or(|age| age > Duration::from_secs(24 * 3600)) {
        println!("xtask: apt's package lists are missing or older than a day; running apt-get update");
        apt_get(&["update"])?;
    }
    let mut found = if which("apt-cache").is_some() {
        search(&[])?
    } else {
        Vec::new()
    };
    if found.is_empty() && which("apt-get").is_some() {
        println!("xtask: apt knows no cloud kernel package; running apt-get update");
        apt_get(&["update"])?;
        found = search(&[])?;
    }
    // Debian 11's archive only when a 5.x series may be wanted.
    if wanted.is_empty() || wanted.iter().any(|w| w.starts_with(&format!("{OLDER_SERIES_MAJOR}."))) {
        found.extend(older_kernels(vm_dir, &search));
    }
    // Whatever was downloaded before stands in for what the archives no longer list.
    if let Ok(entries) = fs::read_dir(vm_dir.join("kernels")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().join("version").is_file()
                && !found.iter().any(|p| p.name == name)
                && let Some(p) = KernelPackage::from_name(&name)
            {
                found.push(p);
            }
        }
    }
    let mut by_series: BTreeMap<(u32, u32), Vec<KernelPackage>> = BTreeMap::new();
    for p in found {
        by_series
            .entry((p.numbers[0], p.numbers[1]))
            .or_default()
            .push(p);
    }
    let chosen: Vec<Vec<KernelPackage>> = by_series
        .into_values()
        .map(|mut candidates| {
            candidates.sort_by(|a, b| b.numbers.cmp(&a.numbers));
            candidates
        })
        .filter(|c| wanted.is_empty() || wanted.contains(&c[0].series()))
        .collect();
    if chosen.is_empty() {
        bail!(
            "no linux-image-*{PACKAGE_SUFFIX} package{} in the configured Debian archive",
            if wanted.is_empty() {
                String::new()
            } else {
                format!(" of series {}", wanted.join(", "))
            }
        );
    }
    // The matrix is these three series: one missing would make a green run claim more than it
    // checked.
    if wanted.is_empty() {
        let missing: Vec<&str> = EXPECTED_SERIES
            .iter()
            .copied()
            .filter(|want| !chosen.iter().any(|c| c[0].series() == *want))
            .collect();
        if !missing.is_empty() {
            bail!(
                "the kernel matrix needs the {} series, which no reachable Debian archive offers \
                 (nor target/vm/kernels/): check apt's sources, or run `cargo xtask vm-test --kernel …` \
                 for the series at hand",
                missing.join(" and ")
            );
        }
    }
    println!(
        "xtask: kernel series: {}",
        chosen
            .iter()
            .map(|c| format!("{} (newest {})", c[0].series(), c[0].name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(chosen)
}

/// Debian 11's 5.x cloud kernels, through a private apt state (sources, lists and cache under
/// `target/vm/apt-debian11/`). An archive that cannot be reached is reported and skipped: the
/// kernels downloaded before still run.
fn older_kernels(
    vm_dir: &Path,
    search: &dyn Fn(&[String]) -> anyhow::Result<Vec<KernelPackage>>,
) -> Vec<KernelPackage> {
    let state = vm_dir.join("apt-debian11");
    let setup = || -> anyhow::Result<Vec<String>> {
        for dir in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(state.join(dir))?;
        }
        let sources = state.join("sources.list");
        fs::write(&sources, OLDER_ARCHIVE)?;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let options = [
            format!("Dir::Etc::SourceList={}", path(&sources)),
            "Dir::Etc::SourceParts=/dev/null".to_owned(),
            format!("Dir::State::Lists={}", path(&state.join("lists"))),
            format!("Dir::Cache={}", path(&state.join("cache"))),
            "Dir::State::Status=/dev/null".to_owned(),
            // Its own lists: no lock on the host's apt is needed.
            "Debug::NoLocking=1".to_owned(),
        ];
        Ok(options
            .into_iter()
            .flat_map(|o| ["-o".to_owned(), o])
            .collect())
    };
    let found = setup().and_then(|options| {
        // Refreshed once a day at most.
        let fresh = fs::metadata(state.join("updated"))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < Duration::from_secs(86_400)));
        if !fresh {
            let mut cmd = Command::new("apt-get");
            cmd.args(&options).args(["-q", "update"]).stdin(Stdio::null());
            output(&mut cmd)?;
            fs::write(state.join("updated"), "")?;
        }
        search(&options)
    });
    match found {
        Ok(packages) => packages
            .into_iter()
            .filter(|p| p.numbers[0] == OLDER_SERIES_MAJOR)
            .collect(),
        Err(err) => {
            println!("xtask: Debian 11's archive is out of reach ({err:#}); no new 5.x kernel this run");
            Vec::new()
        }
    }
}

/// The newest kernel of a series that is cached or can be downloaded (candidates come newest
/// first: a newer package than the cached one is fetched; an older cached one is the fallback
/// when the archive is out of reach).
fn fetch_series(vm_dir: &Path, candidates: &[KernelPackage]) -> anyhow::Result<Kernel> {
    let mut errors = Vec::new();
    for package in candidates {
        match fetch_kernel(vm_dir, package) {
            Ok(kernel) => return Ok(kernel),
            Err(err) => {
                println!("xtask: {}: {err:#}; trying the next older package", package.name);
                errors.push(format!("{}: {err:#}", package.name));
            }
        }
    }
    bail!(
        "no kernel of series {} could be downloaded:\n  {}",
        candidates[0].series(),
        errors.join("\n  ")
    )
}

/// `target/vm/kernels/<package>/` when it was unpacked before.
fn cached_kernel(vm_dir: &Path, package: &KernelPackage) -> Option<Kernel> {
    let dir = vm_dir.join("kernels").join(&package.name);
    let version = fs::read_to_string(dir.join("version")).ok()?;
    let vmlinuz = fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })?;
    let release = vmlinuz
        .file_name()?
        .to_string_lossy()
        .strip_prefix("vmlinuz-")?
        .to_owned();
    Some(Kernel {
        package: package.name.clone(),
        version: version.trim().to_owned(),
        release,
        vmlinuz,
    })
}

/// `target/vm/kernels/<package>/`: `boot/` of the package and its version; downloaded once.
fn fetch_kernel(vm_dir: &Path, package: &KernelPackage) -> anyhow::Result<Kernel> {
    let dir = vm_dir.join("kernels").join(&package.name);
    if let Some(kernel) = cached_kernel(vm_dir, package) {
        return Ok(kernel);
    }
    let work = vm_dir
        .join("kernels")
        .join(format!("{}.download", package.name));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let started = Instant::now();
    let mut cmd = Command::new("apt-get");
    cmd.args(&package.apt_options)
        .args(["download", &package.name])
        .current_dir(&work)
        .stdin(Stdio::null());
    // The private archive's `-o` options are long; the line names the archive instead.
    let shown = format!(
        "apt-get download {}{}",
        package.name,
        if package.apt_options.is_empty() { "" } else { " (Debian 11 archive, apt state in target/vm/apt-debian11)" }
    );
    println!("xtask: {shown} (in {})", work.display());
    let st = status(&mut cmd)?;
    if !st.success() {
        let _ = fs::remove_dir_all(&work);
        bail!("`{shown}` failed ({st})");
    }
    let deb = fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", work.display()))?;
    let version = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Version"),
    )?;
    let root = work.join("root");
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("-x").arg(&deb).arg(&root);
    let st = status(&mut cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(&cmd));
    }
    fs::create_dir_all(&dir)?;
    // boot/ holds vmlinuz, config and System.map; the modules (lib/) are not needed.
    for entry in fs::read_dir(root.join("boot")).context("the package has no boot/")? {
        let entry = entry?;
        fs::rename(entry.path(), dir.join(entry.file_name()))?;
    }
    fs::write(dir.join("version"), version.trim())?;
    fs::remove_dir_all(&work)?;
    println!(
        "xtask: {} {} unpacked in {:.1}s",
        package.name,
        version.trim(),
        started.elapsed().as_secs_f64()
    );
    cached_kernel(vm_dir, package)
        .with_context(|| format!("no vmlinuz-* in {} after unpacking", dir.display()))
}

/// Where [`build_static`] leaves its programs.
pub(crate) fn static_dir(ctx: &Ctx) -> PathBuf {
    ctx.target_dir.join("vm-build").join(HOST_TRIPLE).join("release")
}

/// Builds the guest's programs statically; returns their paths in [`PROGRAMS`]' order.
/// `cargo xtask dist` packages the daemon built here: one build (same packages, same flags,
/// so cargo's feature resolution is the same too) serves both.
pub(crate) fn build_static(ctx: &Ctx) -> anyhow::Result<Vec<PathBuf>> {
    let target_dir = ctx.target_dir.join("vm-build");
    let mut cmd = ctx.cargo();
    // `--target` makes the flags below apply to the target artifacts only: build scripts and
    // proc macros stay dynamic, and aya-build's nested eBPF build sets its own flags.
    cmd.env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .args([
            "build",
            "--release",
            "--target",
            HOST_TRIPLE,
            "--package",
            "reaper-tests",
            // The daemon too, for the systemd machine: static, so the guest's libc never matters.
            "--package",
            "reaper-user",
            "--bin",
            "reaper",
        ]);
    for program in PROGRAMS.iter().chain(&[systemd::CHECKER]) {
        cmd.args(["--bin", program]);
    }
    println!("xtask: {}", describe(&cmd));
    let st = status(&mut cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(&cmd));
    }
    let dir = static_dir(ctx);
    let mut bins = Vec::new();
    for program in PROGRAMS {
        let path = dir.join(program);
        let what = output(Command::new("file").arg("-b").arg(&path))?;
        if !(what.contains("statically linked") || what.contains("static-pie linked")) {
            bail!(
                "{} is not statically linked: {}",
                path.display(),
                what.trim()
            );
        }
        bins.push(path);
    }
    Ok(bins)
}

/// One newc cpio entry.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        u32::try_from(data.len()).expect("a file under 4 GiB"),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1).expect("a short name"),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// `/init` = vm-runner, `/bin/<program>`, the mount points and `/dev/console` (the kernel opens
/// it as init's stdio before devtmpfs exists). Uncompressed: under emulation, decompressing
/// costs more than copying.
fn write_initramfs(path: &Path, bins: &[PathBuf]) -> anyhow::Result<()> {
    let mut out = Vec::new();
    let mut ino = 1;
    let mut next = || {
        ino += 1;
        ino
    };
    for dir in ["bin", "dev", "proc", "sys", "tmp"] {
        cpio_entry(&mut out, next(), dir, 0o040755, (0, 0), &[]);
    }
    cpio_entry(&mut out, next(), "dev/console", 0o020600, (5, 1), &[]);
    for (i, bin) in bins.iter().enumerate() {
        let data = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
        let name = if i == 0 {
            "init".to_owned()
        } else {
            format!("bin/{}", PROGRAMS[i])
        };
        cpio_entry(&mut out, next(), &name, 0o100755, (0, 0), &data);
    }
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// The host kernel's release and offsets, from the static runner itself.
fn host_layout(runner: &Path) -> Option<(String, Vec<(String, String)>)> {
    let text = output(Command::new(runner).arg("--print-offsets")).ok()?;
    let mut release = String::from("host");
    let mut offsets = Vec::new();
    for line in text.lines() {
        if let Some(r) = line.strip_prefix("vm-kernel: ") {
            release = r.trim().to_owned();
        }
        if let Some(o) = parse_offsets(line) {
            offsets = o;
        }
    }
    Some((release, offsets))
}

/// `vm-offsets: KernelOffsets { ready: 1, task_pid: 2456, … }` → [(task_pid, 2456), …].
fn parse_offsets(line: &str) -> Option<Vec<(String, String)>> {
    let rest = &line[line.find("vm-offsets: ")? + "vm-offsets: ".len()..];
    let inner = rest.get(rest.find('{')? + 1..rest.rfind('}')?)?;
    Some(
        inner
            .split(',')
            .filter_map(|kv| kv.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect(),
    )
}

/// `N passed, M failed` (after `vm-result: `) → (N, M).
fn parse_result(text: &str) -> Option<(usize, usize)> {
    let (passed, failed) = text.trim().split_once(", ")?;
    Some((
        passed.strip_suffix(" passed")?.parse().ok()?,
        failed.strip_suffix(" failed")?.parse().ok()?,
    ))
}

/// `vm-check NAME: PASS|FAIL detail` → (NAME, passed, detail).
fn parse_check(line: &str) -> Option<(String, bool, String)> {
    let rest = &line[line.find("vm-check ")? + "vm-check ".len()..];
    let (name, rest) = rest.split_once(": ")?;
    let (word, detail) = rest.split_once(' ').unwrap_or((rest, ""));
    let passed = match word {
        "PASS" => true,
        "FAIL" => false,
        _ => return None,
    };
    Some((name.to_owned(), passed, detail.to_owned()))
}

/// A console line without its carriage returns and terminal escape sequences (SeaBIOS and
/// QEMU's `-nographic` clear the screen and turn off line wrap).
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            // CSI (ESC [ parameters, up to a final byte in @..~) or a two-byte ESC c, ESC 7, …
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' | '\n' => {}
            c => out.push(c),
        }
    }
    out
}

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
    fn matrix(kernel: &Kernel, opts: &Opts) -> Self {
        // The guest's own watchdog ends it a little before ours kills QEMU.
        let guest_deadline = opts.timeout.saturating_sub(30).max(60);
        Self {
            label: kernel.release.clone(),
            memory_mb: 1024,
            append: format!("VM_DEADLINE_SECS={guest_deadline} {}", opts.guest_env.join(" ")),
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
    cmd.arg("-m").arg(machine.memory_mb.to_string()).args([
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-kernel",
    ])
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
                let interesting = if let Some(check) = parse_check(&line) {
                    run.checks.push(check);
                    true
                } else if let Some(offsets) = parse_offsets(&line) {
                    run.offsets = offsets;
                    false
                } else if let Some(r) = line.split_once("vm-result: ").map(|(_, r)| r) {
                    run.result = Some(r.to_owned());
                    true
                } else if let Some(k) = line.split_once("vm-kernel: ").map(|(_, k)| k) {
                    run.kernel_line = Some(k.to_owned());
                    true
                } else if let Some(s) = line.split_once("vm-sock-tracepoints: ").map(|(_, s)| s) {
                    run.sock_tracepoints = Some(s.to_owned());
                    true
                } else if line.contains("vm-error")
                    || line.contains("Kernel panic")
                    || line.contains("panicked")
                    || is_err
                {
                    run.errors.push(line.clone());
                    true
                } else {
                    line.contains("vm-runner:")
                };
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

fn report(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_package_names() {
        let old = KernelPackage::from_name("linux-image-6.1.0-56-cloud-amd64-unsigned").unwrap();
        assert_eq!(old.numbers, [6, 1, 0, 56]);
        assert_eq!(old.series(), "6.1");
        let new =
            KernelPackage::from_name("linux-image-6.12.117+deb12-cloud-amd64-unsigned").unwrap();
        assert_eq!(new.numbers, [6, 12, 117, 12]);
        assert_eq!(new.series(), "6.12");
        let five = KernelPackage::from_name("linux-image-5.10.0-32-cloud-amd64-unsigned").unwrap();
        assert_eq!((five.numbers.as_slice(), five.series().as_str()), (&[5, 10, 0, 32][..], "5.10"));
        assert!(KernelPackage::from_name("linux-image-cloud-amd64-unsigned").is_none());
        assert!(KernelPackage::from_name("linux-image-6.1.0-56-cloud-amd64-dbg").is_none());
    }

    #[test]
    fn a_run_is_ok_only_when_its_own_count_agrees() {
        assert_eq!(parse_result("10 passed, 0 failed"), Some((10, 0)));
        assert_eq!(parse_result("garbled"), None);
        let mut run = Run {
            checks: vec![("a".into(), true, String::new()), ("b".into(), true, String::new())],
            result: Some("2 passed, 0 failed".into()),
            ..Run::default()
        };
        assert!(run.ok());
        // The runner counted a failure whose line never arrived intact.
        run.result = Some("2 passed, 1 failed".into());
        assert!(!run.ok());
        run.result = None;
        assert!(!run.ok());
    }

    #[test]
    fn parses_runner_lines() {
        assert_eq!(
            parse_check("vm-check rename: PASS [0.3s] pid 7: ok"),
            Some(("rename".into(), true, "[0.3s] pid 7: ok".into()))
        );
        assert_eq!(
            parse_check("noise vm-check attach: FAIL boom").map(|c| c.1),
            Some(false)
        );
        assert!(parse_check("vm-check x: MAYBE").is_none());
        assert_eq!(
            strip_escapes("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (1.16)\r\n"),
            "SeaBIOS (1.16)"
        );
        let o = parse_offsets("vm-offsets: KernelOffsets { ready: 1, task_pid: 2456 }").unwrap();
        assert_eq!(
            o,
            [
                ("ready".into(), "1".into()),
                ("task_pid".into(), "2456".into())
            ]
        );
    }

    #[test]
    fn writes_newc_cpio() {
        let mut out = Vec::new();
        cpio_entry(&mut out, 2, "init", 0o100755, (0, 0), b"abc");
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // 110-byte header, "init\0" padded to 116, 3 data bytes padded to 120.
        assert_eq!(out.len(), 120);
        assert_eq!(&out[110..114], b"init");
        assert_eq!(&out[116..119], b"abc");
    }
}
