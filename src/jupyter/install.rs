//! Kernelspecs: `knlp jupyter install` writes `kernels/<name>/kernel.json`
//! (and logos) where `jupyter kernelspec list` finds it.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

/// Where to install.
pub enum Target {
    /// The user's Jupyter data folder (`$JUPYTER_DATA_DIR`, else
    /// `$XDG_DATA_HOME/jupyter`, else `~/.local/share/jupyter`).
    User,
    /// `<prefix>/share/jupyter` (a virtual environment, a test's temporary folder).
    Prefix(PathBuf),
}

/// The Jupyter data folder of `target`.
pub fn data_dir(target: &Target) -> Result<PathBuf> {
    Ok(match target {
        Target::Prefix(p) => p.join("share/jupyter"),
        Target::User => {
            if let Some(d) = std::env::var_os("JUPYTER_DATA_DIR").filter(|d| !d.is_empty()) {
                PathBuf::from(d)
            } else if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
                PathBuf::from(d).join("jupyter")
            } else if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
                if cfg!(target_os = "macos") {
                    PathBuf::from(h).join("Library/Jupyter")
                } else {
                    PathBuf::from(h).join(".local/share/jupyter")
                }
            } else {
                bail!("no home folder: set JUPYTER_DATA_DIR or use --prefix");
            }
        }
    })
}

/// The kernelspec of a kernel started as `exe jupyter kernel -f FILE`.
pub fn kernel_json(exe: &Path, display_name: &str) -> serde_json::Value {
    json!({
        "argv": [exe.display().to_string(), "jupyter", "kernel", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "rhai",
        "interrupt_mode": "message",
        "metadata": { "debugger": false },
    })
}

/// Write the kernelspec `name` into `target`; returns its folder.
pub fn install(target: &Target, name: &str, display_name: &str) -> Result<PathBuf> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        bail!("--name {name:?}: kernel names are letters, digits, '.', '_' and '-'");
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let dir = data_dir(target)?.join("kernels").join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let spec = serde_json::to_string_pretty(&kernel_json(&exe, display_name))?;
    let file = dir.join("kernel.json");
    std::fs::write(&file, spec + "\n").with_context(|| format!("{}: cannot write", file.display()))?;
    for size in [32, 64] {
        let logo = dir.join(format!("logo-{size}x{size}.png"));
        if let Err(e) = report::plot::logo(&logo, size) {
            eprintln!("warning: no logo: {e:#}");
        }
    }
    Ok(dir)
}

/// Remove the kernelspec `name` from `target`; returns its folder.
pub fn uninstall(target: &Target, name: &str) -> Result<PathBuf> {
    let dir = data_dir(target)?.join("kernels").join(name);
    if !dir.join("kernel.json").is_file() {
        bail!("{}: no kernelspec here", dir.display());
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot remove", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_starts_this_program_with_the_connection_file() {
        let j = kernel_json(Path::new("/opt/knlp"), "knlp (Rhai)");
        assert_eq!(j["argv"], json!(["/opt/knlp", "jupyter", "kernel", "-f", "{connection_file}"]));
        assert_eq!(j["language"], "rhai");
    }

    #[test]
    fn prefix_installs_under_share_jupyter() {
        let d = data_dir(&Target::Prefix(PathBuf::from("/tmp/p"))).unwrap();
        assert_eq!(d, PathBuf::from("/tmp/p/share/jupyter"));
    }
}
