//! `knlp archive NAME [PROJECT...]` (`make archive NAME=...`): keep a
//! project's results, not its checkpoints, under `key_results/<NAME>/`
//! with its graphs, its `report.md` and an `index.md` of everything kept,
//! as the Python knlp's results archive does (by hand there).
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::table::{render_markdown, results_table, TableOptions};

/// What was archived: (project name, runs, runs done) per project.
#[derive(Debug)]
pub struct Archived {
    pub dir: PathBuf,
    pub projects: Vec<(String, usize, usize)>,
    pub files: usize,
    pub bytes: u64,
}

/// Files and folders a results archive leaves out: weights (checkpoints,
/// any safetensors file), locks and unfinished temporary writes.
fn skipped(name: &str) -> bool {
    name == "checkpoints" || name == ".lock" || name.ends_with(".safetensors") || name.contains(".tmp-")
}

/// Copy `src` into `dst` (regular files and folders only; links and other
/// special files are left out, so the archive never points elsewhere).
fn copy_results(src: &Path, dst: &Path, files: &mut usize, bytes: &mut u64) -> Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("{}", dst.display()))?;
    let mut entries: Vec<_> = fs::read_dir(src).with_context(|| format!("{}", src.display()))?.collect();
    entries.sort_by_key(|e| e.as_ref().map(|e| e.file_name()).ok());
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if skipped(&name) {
            continue;
        }
        let ft = e.file_type()?;
        let to = dst.join(&name);
        if ft.is_dir() {
            copy_results(&e.path(), &to, files, bytes)?;
        } else if ft.is_file() {
            *bytes += fs::copy(e.path(), &to).with_context(|| format!("{}", e.path().display()))?;
            *files += 1;
        }
    }
    Ok(())
}

/// Archive `projects` (project folders) as `out/<name>/<project>/`, draw
/// each one's graphs and report there, and write `out/<name>/index.md`.
/// An existing archive of that name is never overwritten.
pub fn archive(name: &str, projects: &[PathBuf], out: &Path) -> Result<Archived> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        bail!("archive name '{name}': use 1 to 100 letters, digits, '-', '_' or '.', not starting with '.'");
    }
    if projects.is_empty() {
        bail!("archive {name}: no project given");
    }
    let dir = out.join(name);
    if dir.exists() {
        bail!("{} already exists; choose another NAME or remove it", dir.display());
    }
    // Build next to the destination, then rename: a failed archive leaves nothing half-written.
    fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
    let tmp = out.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<Archived> {
        let mut a = Archived { dir: dir.clone(), projects: Vec::new(), files: 0, bytes: 0 };
        let mut index = format!("# Results archive: {name}\n\n");
        for p in projects {
            let pname = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .filter(|n| !n.is_empty())
                .ok_or_else(|| anyhow::anyhow!("{}: not a project folder", p.display()))?;
            if a.projects.iter().any(|(n, _, _)| *n == pname) {
                bail!("project {pname} is given twice");
            }
            let copy = tmp.join(&pname);
            copy_results(p, &copy, &mut a.files, &mut a.bytes)?;
            let project = crate::load_project(&copy)?;
            let set = crate::write_graphs(&project)?;
            a.files += set.files.len();
            let done = project.runs.iter().filter(|r| r.status == "done").count();
            index.push_str(&format!(
                "## {pname}\n\nFrom `{}`: {} run(s), {done} done. Graphs and report: [{pname}/graphs/report.md]({pname}/graphs/report.md).\n\n",
                p.display(),
                project.runs.len()
            ));
            let table = results_table(&project, &TableOptions::default())?;
            index.push_str(&render_markdown(&table));
            index.push('\n');
            a.projects.push((pname, project.runs.len(), done));
        }
        fs::write(tmp.join("index.md"), index)?;
        a.files += 1;
        Ok(a)
    })();
    match result {
        Ok(a) => {
            fs::rename(&tmp, &dir).with_context(|| format!("{}", dir.display()))?;
            Ok(a)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
