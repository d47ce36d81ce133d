//! `import "name" as m;` resolution: the importing file's folder, then the
//! script's base folder, then the standard library (`stdlib/`, embedded in
//! the binary; `KNLP_STDLIB` points at a folder to use instead while editing it).
//!
//! Import paths are relative names only: no absolute paths, no `..`, so an
//! import can only read `.rhai` files below the script's folder or stdlib.
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rhai::{Engine, EvalAltResult, Module, ModuleResolver, Position, Scope, Shared};

type SharedModule = Shared<Module>;

include!(concat!(env!("OUT_DIR"), "/stdlib.rs"));

/// Source texts by display name, for error rendering.
pub type Sources = Rc<RefCell<HashMap<String, String>>>;

pub struct Resolver {
    base_dir: PathBuf,
    sources: Sources,
    cache: RefCell<HashMap<String, SharedModule>>,
}

impl Resolver {
    pub fn new(base_dir: PathBuf, sources: Sources) -> Self {
        Resolver { base_dir, sources, cache: RefCell::new(HashMap::new()) }
    }

    /// Names of the embedded standard-library modules.
    pub fn stdlib_modules() -> Vec<&'static str> {
        STDLIB.iter().map(|(n, _)| *n).collect()
    }

    /// Find the text of module `path`; returns (display name, text).
    pub fn find(&self, importer: Option<&str>, path: &str) -> Result<Option<(String, String)>, String> {
        check_import_path(path)?;
        let file = if path.ends_with(".rhai") { path.to_string() } else { format!("{path}.rhai") };
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some(dir) = importer.map(Path::new).and_then(Path::parent) {
            if importer.is_some_and(|s| !s.starts_with("<")) {
                dirs.push(dir.to_path_buf());
            }
        }
        dirs.push(self.base_dir.clone());
        if let Some(dir) = std::env::var_os("KNLP_STDLIB") {
            dirs.push(PathBuf::from(dir));
        }
        for d in dirs {
            let p = d.join(&file);
            if p.is_file() {
                // A symbolic link must not lead outside the folder searched.
                let root = if d.as_os_str().is_empty() { Path::new(".") } else { d.as_path() };
                let inside = match (p.canonicalize(), root.canonicalize()) {
                    (Ok(real), Ok(root)) => real.starts_with(&root),
                    _ => false,
                };
                if !inside {
                    return Err(format!(
                        "import \"{path}\": {} leads outside {} (through a symbolic link); imports read only files below the script's folder",
                        display(&p),
                        display(root)
                    ));
                }
                let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                return Ok(Some((display(&p), text)));
            }
        }
        let stem = file.trim_end_matches(".rhai");
        Ok(STDLIB
            .iter()
            .find(|(n, _)| *n == stem)
            .map(|(n, text)| (format!("stdlib/{n}.rhai"), text.to_string())))
    }

    /// Compile and evaluate a module (cached per display name).
    pub fn load(
        &self,
        engine: &Engine,
        importer: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        let found =
            self.find(importer, path).map_err(|e| Box::new(EvalAltResult::ErrorRuntime(e.into(), pos)))?;
        let Some((name, text)) = found else {
            return Err(Box::new(EvalAltResult::ErrorModuleNotFound(path.into(), pos)));
        };
        if let Some(m) = self.cache.borrow().get(&name) {
            return Ok(m.clone());
        }
        self.sources.borrow_mut().insert(name.clone(), text.clone());
        let mut ast = engine
            .compile(&text)
            .map_err(|e| Box::new(EvalAltResult::ErrorInModule(name.clone(), Box::new(e.into()), pos)))?;
        ast.set_source(name.as_str());
        let module = Module::eval_ast_as_new(Scope::new(), &ast, engine)
            .map_err(|e| Box::new(EvalAltResult::ErrorInModule(name.clone(), e, pos)))?;
        let shared: SharedModule = module.into();
        self.cache.borrow_mut().insert(name, shared.clone());
        Ok(shared)
    }

    /// Forget cached modules (the shell's `:reset`).
    pub fn clear_cache(&self) {
        self.cache.borrow_mut().clear();
    }
}

/// A path shown to users: relative to the working folder when possible.
pub fn display(p: &Path) -> String {
    let cwd = std::env::current_dir().ok();
    let shown = cwd.as_deref().and_then(|c| p.strip_prefix(c).ok()).unwrap_or(p);
    shown.to_string_lossy().trim_start_matches("./").to_string()
}

fn check_import_path(path: &str) -> Result<(), String> {
    let ok_chars = path.chars().all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c));
    let p = Path::new(path);
    if path.is_empty()
        || !ok_chars
        || p.is_absolute()
        || p.components().any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!(
            "import \"{path}\": module names are relative paths of letters, digits, '_', '-', '.' and '/', without '..'"
        ));
    }
    Ok(())
}

impl ModuleResolver for Resolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        self.load(engine, source, path, pos)
    }
}

/// Shared handle so the runtime can keep using the resolver it installed.
pub struct SharedResolver(pub Rc<Resolver>);

impl ModuleResolver for SharedResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        self.0.load(engine, source, path, pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escaping_paths() {
        for bad in ["/etc/passwd", "../x", "a/../../b", "x y", ""] {
            assert!(check_import_path(bad).is_err(), "{bad}");
        }
        for good in ["util", "lib/stats", "my-mod.rhai"] {
            assert!(check_import_path(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn symbolic_links_do_not_lead_out_of_the_tree() {
        let root = std::env::temp_dir().join(format!("knlp-resolver-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (tree, outside) = (root.join("tree"), root.join("outside"));
        std::fs::create_dir_all(tree.join("lib")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.rhai"), "let x = 1;").unwrap();
        std::fs::write(tree.join("lib/ok.rhai"), "let y = 2;").unwrap();
        std::os::unix::fs::symlink(outside.join("secret.rhai"), tree.join("evil.rhai")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("ext")).unwrap();
        std::os::unix::fs::symlink(tree.join("lib/ok.rhai"), tree.join("alias.rhai")).unwrap();
        let r = Resolver::new(tree.clone(), Sources::default());
        for bad in ["evil", "ext/secret"] {
            let e = r.find(None, bad).unwrap_err();
            assert!(e.contains("symbolic link") && !e.contains("let x"), "{bad}: {e}");
        }
        // A link that stays inside the tree is fine.
        assert_eq!(r.find(None, "alias").unwrap().unwrap().1, "let y = 2;");
        assert_eq!(r.find(None, "lib/ok").unwrap().unwrap().1, "let y = 2;");
        let _ = std::fs::remove_dir_all(&root);
    }
}
