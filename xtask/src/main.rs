//! `cargo xtask`: developer tasks for reaper (modelled on aya's xtask).
//!
//! `cargo xtask setup` installs what building the eBPF crate needs (nightly's `rust-src`, and a
//! `bpf-linker` built against nightly's own libLLVM in `<workspace>/.tools`); every other verb runs
//! it first, so a fresh checkout only needs `cargo xtask build` / `run` / `test`.
mod bench;
mod clippy;
mod cmd;
mod ctx;
mod dist;
mod e2e;
mod fuzz;
mod setup;
mod test;
mod vm;

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::cmd::describe;
pub(crate) use crate::ctx::Ctx;

/// Developer tasks for reaper: set up the eBPF toolchain, build, run and test the daemon.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    /// Directory that holds bpf-linker and its LLVM symlinks (default: <workspace>/.tools).
    #[arg(
        long,
        env = "REAPER_TOOLS_DIR",
        global = true,
        hide = true,
        value_name = "DIR"
    )]
    tools_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Check the prerequisites for building the eBPF programs and install what is missing
    /// (idempotent): the nightly toolchain (checked only), its rust-src component, and
    /// bpf-linker built against nightly's libLLVM in .tools/.
    Setup,

    /// Set up, then build the daemon (`cargo build --release -p reaper-user`).
    Build {
        /// Build the debug profile (target/debug/reaper) instead of release.
        #[arg(long)]
        debug: bool,
    },

    /// Set up, build the daemon, then replace this process with `reaper run ARGS…` (needs root).
    ///
    /// Example: sudo -E cargo xtask run -- --help
    Run {
        /// Build and run the debug profile instead of release.
        #[arg(long)]
        debug: bool,

        /// Arguments for `reaper run` (put them after `--`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },

    /// Install the pinned Claude Agent SDKs, CLI and bun that the end-to-end tests drive into
    /// .tools/e2e/ (npm and a Python venv; idempotent, `test` runs it too).
    SetupE2e,

    /// Set up, build the daemon (the command-line tests run it), then run every host test (unit
    /// tests and the kernel integration tests in `tests/`) one at a time, since they share kernel
    /// state (needs root). Every fuzz target in fuzz/fuzz_targets is built too, on stable, and
    /// replayed over its corpus and mutations of it for a few seconds (fuzz/replay; seconds per
    /// target from REAPER_FUZZ_SECONDS, default 3), each counted as one test.
    ///
    /// Runs `cargo build [--release] -p reaper-user` and `cargo xtask dist`, installs the
    /// end-to-end tests' pinned SDKs and CLI (`setup-e2e`), then
    /// `cargo test --workspace --exclude reaper-ebpf --no-fail-fast -- --test-threads=1 ARGS…`.
    /// ARGS go to the test harness: a name filter, `--list`, `--nocapture`, `--exact`, …
    ///
    /// Example: sudo -E cargo xtask test -- tree_
    Test {
        /// Test only this package (repeatable) instead of the whole workspace.
        #[arg(short, long, value_name = "SPEC")]
        package: Vec<String>,

        /// Build the tests with the release profile.
        #[arg(long)]
        release: bool,

        /// Skip the kernel matrix (`cargo xtask vm-test`), which a full run includes.
        #[arg(long)]
        no_vm: bool,

        /// Arguments for the test harness (put them after `--`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },

    /// Set up, build the release binaries, then run the benchmarks (spawn-storm overhead against
    /// no tracer and bpftrace, throughput and loss, reap latency, footprint, start-up) and write
    /// one table to stdout, bench/results/latest.md and latest.json (needs root; about 8 min).
    ///
    /// Installs bpftrace with apt-get if it is missing. No number fails the verb; a benchmark
    /// that cannot run does.
    Bench {
        #[command(flatten)]
        opts: bench::Opts,
    },

    /// Set up, then boot Debian's packaged cloud kernels (the newest of each series the
    /// configured archive has, 6.1 and 6.12 on bookworm, and Debian 11's 5.10) in QEMU with a static test runner as init, run the
    /// lifecycle and reaping checks in each, and report per kernel (needs root; downloads the
    /// kernels and installs qemu-system-x86 with apt the first time).
    ///
    /// Logs go to target/vm/<kernel>.log. Fails if any check fails or a machine does not finish.
    VmTest {
        #[command(flatten)]
        opts: vm::Opts,
    },

    /// Set up, then build what operators install into target/dist/, offline: the static
    /// binary's tarball (with licenses, README, deploy/, man pages, completions, SHA256SUMS),
    /// a .deb (unit enabled and started on install) and an OCI image archive (buildah,
    /// `FROM scratch`), and SHA256SUMS over the three.
    ///
    /// Installs Debian's buildah, dpkg, binutils and file with apt when missing.
    Dist,

    /// Set up, then run every cargo-fuzz target in fuzz/ (event decoder, config parser, /proc
    /// parsers, argv and rule matching) for a bounded time each, and print runs and coverage.
    ///
    /// Needs the nightly toolchain; installs cargo-fuzz into target/fuzz-tools the first time
    /// (the first build instruments every dependency: several minutes). Seeds in
    /// fuzz/corpus/<target> are only read; findings go to target/fuzz/. Fails if a target crashes.
    Fuzz {
        #[command(flatten)]
        opts: fuzz::Opts,
    },

    /// Set up, then run clippy with warnings denied: on the host crates
    /// (`cargo clippy --workspace --exclude reaper-ebpf --all-targets -- -D warnings`), then on
    /// the eBPF crate with nightly for bpfel-unknown-none (installs nightly's clippy if missing);
    /// then `cargo fmt --all --check` and cargo-machete for unused dependencies (installed into
    /// .tools/ the first time). Every check runs; fails if any did.
    Clippy,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(cli.tools_dir)?;
    match cli.command {
        Verb::Setup => {
            setup::setup(&ctx)?;
        }
        Verb::SetupE2e => {
            e2e::setup(&ctx)?;
        }
        Verb::Build { debug } => {
            setup::setup(&ctx)?;
            let bin = ctx.build_daemon(debug)?;
            println!("xtask: daemon built: {}", bin.display());
        }
        Verb::Run { debug, args } => {
            setup::require_root("run")?;
            setup::setup(&ctx)?;
            let bin = ctx.build_daemon(debug)?;
            let mut cmd = std::process::Command::new(&bin);
            cmd.arg("run").args(&args);
            eprintln!("xtask: exec {}", describe(&cmd));
            // Only returns on failure; on success the daemon replaces this process, so signals
            // (Ctrl-C, SIGTERM) reach it directly.
            let err = cmd.exec();
            return Err(err).with_context(|| format!("cannot exec {}", bin.display()));
        }
        Verb::Test {
            package,
            release,
            no_vm,
            args,
        } => {
            setup::require_root("test")?;
            setup::setup(&ctx)?;
            return test::run(&ctx, &package, release, no_vm, &args);
        }
        Verb::Bench { opts } => {
            setup::require_root("bench")?;
            setup::setup(&ctx)?;
            bench::run(&ctx, &opts)?;
        }
        Verb::VmTest { opts } => {
            setup::require_root("vm-test")?;
            setup::setup(&ctx)?;
            return Ok(vm::run(&ctx, &opts)?.exit_code());
        }
        Verb::Dist => {
            setup::setup(&ctx)?;
            dist::run(&ctx)?;
        }
        Verb::Fuzz { opts } => {
            setup::setup(&ctx)?;
            return fuzz::run(&ctx, &opts);
        }
        Verb::Clippy => {
            setup::setup(&ctx)?;
            return clippy::run(&ctx);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The child's exit code if it is a non-zero byte, else plain failure.
fn exit_code(st: std::process::ExitStatus) -> ExitCode {
    st.code()
        .and_then(|c| u8::try_from(c).ok())
        .filter(|&c| c != 0)
        .map_or(ExitCode::FAILURE, ExitCode::from)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Verb};

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_args_pass_through() {
        for argv in [
            &["cargo xtask", "test", "--", "tree_", "--nocapture"][..],
            &["cargo xtask", "test", "tree_", "--nocapture"][..],
        ] {
            let Verb::Test {
                args,
                package,
                release,
                ..
            } = Cli::try_parse_from(argv).unwrap().command
            else {
                panic!("not the test verb");
            };
            assert_eq!(args, ["tree_", "--nocapture"]);
            assert!(package.is_empty() && !release);
        }
        let Verb::Run { args, debug } =
            Cli::try_parse_from(["cargo xtask", "run", "--", "--debug", "-v"])
                .unwrap()
                .command
        else {
            panic!("not the run verb");
        };
        assert_eq!(args, ["--debug", "-v"]);
        assert!(!debug);
    }
}
