//! What the end-to-end tests (`tests/tests/e2e.rs`) drive: the real Claude Agent SDKs and CLI,
//! pinned, installed once into `<tools>/e2e` (gitignored):
//!
//! - `npm/`: `@anthropic-ai/claude-agent-sdk` (with its platform package's native `claude`),
//!   `@anthropic-ai/claude-code` (`bin/claude.exe`) and `bun`, by `npm install`;
//! - `venv/`: a Python virtual environment with PyPI's `claude-agent-sdk` (which bundles its own
//!   CLI), by `pip install`;
//! - `stamp`: the pinned versions and the interpreters they were installed with. When it matches
//!   and every entry point is in place, nothing is run (a few stat calls).
//!
//! If a registry cannot be reached the step fails with one sentence saying so: the end-to-end
//! tests then fail too (they are never skipped).
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::Ctx;
use crate::cmd::{describe, output, status_tee_stderr};

/// The npm packages, pinned (CLAUDE-PROCESS.md's measurements used these).
pub(crate) const NPM_PACKAGES: [(&str, &str); 3] = [
    ("@anthropic-ai/claude-agent-sdk", "0.3.329"),
    ("@anthropic-ai/claude-code", "2.1.329"),
    ("bun", "1.4.5"),
];

/// The PyPI package, pinned.
pub(crate) const PYPI_PACKAGE: (&str, &str) = ("claude-agent-sdk", "0.2.184");

/// Where the packages go: `<tools>/e2e`.
pub(crate) fn dir(ctx: &Ctx) -> PathBuf {
    ctx.tools.join("e2e")
}

/// The files the tests run; each must exist (and be executable) for an install to count.
fn entry_points(root: &Path) -> Vec<PathBuf> {
    let nm = root.join("npm").join("node_modules");
    vec![
        nm.join("@anthropic-ai/claude-agent-sdk/package.json"),
        nm.join("@anthropic-ai/claude-agent-sdk-linux-x64/claude"),
        nm.join("@anthropic-ai/claude-code/bin/claude.exe"),
        nm.join(".bin/bun"),
        root.join("venv/bin/python"),
    ]
}

/// Installs what is missing; prints one line when everything is already there.
pub(crate) fn setup(ctx: &Ctx) -> anyhow::Result<()> {
    let root = dir(ctx);
    let started = Instant::now();
    let node = tool_version("node", &["--version"])?;
    let python = tool_version("python3", &["--version"])?;
    let want = stamp_text(&node, &python);
    let stamp_path = root.join("stamp");
    let stamp = fs::read_to_string(&stamp_path).ok();
    let missing: Vec<PathBuf> = entry_points(&root)
        .into_iter()
        .filter(|p| !p.exists())
        .collect();
    if stamp.as_deref() == Some(want.as_str()) && missing.is_empty() {
        println!(
            "xtask: e2e packages (claude-agent-sdk {}, claude-code {}, bun {}, PyPI claude-agent-sdk \
             {}): present in {} ({:.2}s)",
            NPM_PACKAGES[0].1,
            NPM_PACKAGES[1].1,
            NPM_PACKAGES[2].1,
            PYPI_PACKAGE.1,
            root.display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let why = match (&stamp, missing.first()) {
        (None, _) => "not installed".to_owned(),
        (Some(s), _) if *s != want => "the pinned versions or interpreters changed".to_owned(),
        (_, Some(path)) => format!("{} is missing", path.display()),
        _ => unreachable!("handled above"),
    };
    println!(
        "xtask: e2e packages: {why}; installing into {} (about 750 MB, a minute or two)…",
        root.display()
    );
    // A failed install must not leave a stamp that looks current.
    match fs::remove_file(&stamp_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", stamp_path.display()));
        }
        _ => {}
    }
    install_npm(&root.join("npm"))?;
    install_pypi(&root.join("venv"))?;
    let still_missing: Vec<String> = entry_points(&root)
        .into_iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "the e2e packages installed, but these files are not where the tests look: {}",
            still_missing.join(", ")
        );
    }
    check_versions(&root)?;
    fs::write(&stamp_path, &want)
        .with_context(|| format!("cannot write {}", stamp_path.display()))?;
    println!(
        "xtask: e2e packages: installed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn stamp_text(node: &str, python: &str) -> String {
    let mut text = String::new();
    for (name, version) in NPM_PACKAGES {
        text.push_str(&format!("npm {name}@{version}\n"));
    }
    text.push_str(&format!("pypi {}=={}\n", PYPI_PACKAGE.0, PYPI_PACKAGE.1));
    text.push_str(&format!("node {node}\npython {python}\n"));
    text
}

/// `tool ARGS` must run: the first line it prints (stdout, or stderr for old pythons).
fn tool_version(tool: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "`{tool}` is not on PATH: the end-to-end tests need Node.js (with npm) and \
                 Python 3.10 or newer to install and run the Claude Agent SDKs"
            ),
            _ => anyhow::Error::new(e).context(format!("cannot run `{tool}`")),
        })?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// `npm install` of the pinned packages into `dir` (its own package.json, so the workspace's
/// tree is never touched).
fn install_npm(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let deps: Vec<String> = NPM_PACKAGES
        .iter()
        .map(|(name, version)| format!("    \"{name}\": \"{version}\""))
        .collect();
    let manifest = format!(
        "{{\n  \"name\": \"reaper-e2e-packages\",\n  \"private\": true,\n  \"description\": \
         \"Written by cargo xtask: the packages tests/tests/e2e.rs drives\",\n  \"dependencies\": \
         {{\n{}\n  }}\n}}\n",
        deps.join(",\n")
    );
    let manifest_path = dir.join("package.json");
    fs::write(&manifest_path, manifest)
        .with_context(|| format!("cannot write {}", manifest_path.display()))?;
    let mut cmd = Command::new("npm");
    cmd.current_dir(dir)
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        // Written packages are the pinned ones exactly; the lock file only makes reinstalls
        // resolve the same tree.
        .arg("--save-exact");
    let what = NPM_PACKAGES
        .iter()
        .map(|(n, v)| format!("{n}@{v}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("xtask: e2e: npm install {what} (in {})", dir.display());
    let step = Instant::now();
    let (st, stderr) = status_tee_stderr(&mut cmd)?;
    if !st.success() {
        if unreachable_registry(&stderr) {
            bail!(
                "npm could not reach its registry, so the end-to-end tests cannot install the \
                 pinned {what} they need (restore access to the npm registry and run again)"
            );
        }
        bail!("`{}` failed ({st}): {}", describe(&cmd), tail(&stderr));
    }
    println!(
        "xtask: e2e: npm install done in {:.0}s",
        step.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A virtual environment in `venv` with the pinned PyPI package.
fn install_pypi(venv: &Path) -> anyhow::Result<()> {
    let step = Instant::now();
    let python = venv.join("bin").join("python");
    if !python.exists() {
        println!("xtask: e2e: python3 -m venv {}", venv.display());
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "venv"]).arg(venv);
        output(&mut cmd)?;
    }
    let spec = format!("{}=={}", PYPI_PACKAGE.0, PYPI_PACKAGE.1);
    println!("xtask: e2e: pip install {spec} (into {})", venv.display());
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &spec,
    ]);
    let (st, stderr) = status_tee_stderr(&mut cmd)?;
    if !st.success() {
        if unreachable_registry(&stderr) {
            bail!(
                "pip could not reach PyPI, so the end-to-end tests cannot install the pinned \
                 {spec} they need (restore access to PyPI and run again)"
            );
        }
        bail!("`{}` failed ({st}): {}", describe(&cmd), tail(&stderr));
    }
    println!(
        "xtask: e2e: pip install done in {:.0}s",
        step.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What npm and pip print when the registry is unreachable (DNS, refused, timed out, proxy).
fn unreachable_registry(stderr: &str) -> bool {
    [
        "ENOTFOUND",
        "EAI_AGAIN",
        "ECONNREFUSED",
        "ECONNRESET",
        "ETIMEDOUT",
        "ENETUNREACH",
        "EHOSTUNREACH",
        "network",
        "Network",
        "NewConnectionError",
        "Max retries exceeded",
        "Temporary failure in name resolution",
        "Name or service not known",
        "ProxyError",
        "No matching distribution found",
    ]
    .iter()
    .any(|needle| stderr.contains(needle))
}

/// The last lines of a tool's stderr, for an error message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Each installed program reports the pinned version.
fn check_versions(root: &Path) -> anyhow::Result<()> {
    let nm = root.join("npm").join("node_modules");
    let sdk = fs::read_to_string(nm.join("@anthropic-ai/claude-agent-sdk/package.json"))
        .context("reading the installed claude-agent-sdk's package.json")?;
    let want_sdk = format!("\"version\": \"{}\"", NPM_PACKAGES[0].1);
    if !sdk.contains(&want_sdk) {
        bail!(
            "the installed @anthropic-ai/claude-agent-sdk is not {}",
            NPM_PACKAGES[0].1
        );
    }
    let checks: [(PathBuf, &str); 3] = [
        (
            nm.join("@anthropic-ai/claude-agent-sdk-linux-x64/claude"),
            NPM_PACKAGES[1].1,
        ),
        (
            nm.join("@anthropic-ai/claude-code/bin/claude.exe"),
            NPM_PACKAGES[1].1,
        ),
        (nm.join(".bin/bun"), NPM_PACKAGES[2].1),
    ];
    for (bin, version) in checks {
        let mut cmd = Command::new(&bin);
        let home = root.join("version-home");
        fs::create_dir_all(&home).with_context(|| format!("cannot create {}", home.display()))?;
        cmd.arg("--version")
            // The CLI answers --version offline; keep it out of the real home anyway.
            .env("HOME", &home)
            .env("CLAUDE_CONFIG_DIR", home.join(".claude"))
            .env("DISABLE_AUTOUPDATER", "1")
            .env("DISABLE_TELEMETRY", "1");
        let got = output(&mut cmd)?;
        if !got.contains(version) {
            bail!(
                "`{} --version` printed {:?}, expected {version}",
                bin.display(),
                got.trim()
            );
        }
        println!("xtask: e2e: {} --version: {}", bin.display(), got.trim());
    }
    let mut cmd = Command::new(root.join("venv/bin/python"));
    cmd.args([
        "-c",
        "import importlib.metadata as m; print(m.version('claude-agent-sdk'))",
    ]);
    let got = output(&mut cmd)?;
    if got.trim() != PYPI_PACKAGE.1 {
        bail!(
            "the venv's claude-agent-sdk is {:?}, expected {}",
            got.trim(),
            PYPI_PACKAGE.1
        );
    }
    println!("xtask: e2e: PyPI claude-agent-sdk {}", got.trim());
    Ok(())
}
