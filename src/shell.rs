//! `knlp-shell`: an interactive Rhai session with knlp's bindings.
//!
//! Variables, functions and `import` aliases persist across inputs; input
//! continues over several lines while it is incomplete; errors print like
//! `knlp run` and the session goes on. With a pipe on stdin it reads inputs
//! without prompts, for automation and tests.
use std::cell::RefCell;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Context, Editor, Helper};

use crate::script::{api, complete, Limits, Runtime};

const COMMANDS: &[(&str, &str)] = &[
    (":help", "this list; `:help NAME` documents a function"),
    (":load FILE", "run a script file in this session (its variables and functions stay)"),
    (":vars", "variables in scope with their types"),
    (":hooks [MODEL]", "hook points of a model variable (all models when none is named)"),
    (":cache", "names and shapes of the last run_with_cache's activations"),
    (":reset", "forget all variables, functions and imports"),
    (":quit", "leave (also Ctrl-D)"),
];

pub struct Shell {
    rt: Rc<RefCell<Runtime>>,
    failed: bool,
    /// The code of an `exit(n)`, which ends the session.
    exit: Option<i32>,
}

impl Shell {
    pub fn new(limits: Limits) -> Self {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let rt = Runtime::interactive(cwd, limits);
        Shell { rt: Rc::new(RefCell::new(rt)), failed: false, exit: None }
    }

    /// Run until end of input or `exit(n)`. Returns the exit status: `n`
    /// after `exit(n)`; else 0, or 1 when any input failed in
    /// non-interactive mode.
    pub fn run(mut self) -> i32 {
        let interactive = std::io::stdin().is_terminal();
        if interactive {
            self.interactive();
        } else {
            self.piped();
        }
        match self.exit {
            Some(n) => n,
            None => i32::from(!interactive && self.failed),
        }
    }

    /// Handle one complete input; false means quit.
    fn handle(&mut self, input: &str) -> bool {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return true;
        }
        if let Some(cmd) = trimmed.strip_prefix(':') {
            return self.command(cmd);
        }
        // A panic in a binding is a bug, but it must not end the session
        // and everything in it (the Jupyter kernel does the same).
        let rt = &self.rt;
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.borrow_mut().eval_input(input)
        })) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                let first = msg.lines().next().unwrap_or_default();
                eprintln!(
                    "internal error (a bug in knlp; please report it): {first}\nthe session goes on; values this input was changing may be half-updated"
                );
                self.failed = true;
                return true;
            }
        };
        match result {
            Ok(v) if v.is_unit() => {}
            Ok(v) => println!("{}", self.rt.borrow().display(&v)),
            Err(e) => {
                if let crate::script::errors::Ending::Exit(n) = e.ending {
                    self.exit = Some(n);
                    return false;
                }
                self.failed = true;
                eprint!("{}", e.rendered);
            }
        }
        let _ = std::io::stdout().flush();
        true
    }

    fn command(&mut self, cmd: &str) -> bool {
        let (name, arg) = cmd.split_once(char::is_whitespace).map_or((cmd, ""), |(a, b)| (a, b.trim()));
        match name {
            "q" | "quit" | "exit" => return false,
            "help" | "h" if arg.is_empty() => {
                println!("commands:");
                for (c, d) in COMMANDS {
                    println!("  {c:<12} {d}");
                }
                println!("function groups (see `:help NAME` or `knlp doc`):");
                for (g, intro) in api::GROUPS {
                    println!("  {g}: {intro}");
                }
            }
            "help" | "h" | "doc" => {
                let rt = self.rt.borrow();
                let found = api::lookup(&rt.docs, arg);
                if found.is_empty() {
                    println!("no documented function '{arg}'");
                    self.failed = true;
                }
                for d in found {
                    println!("{}\n    {}", d.signature, d.doc);
                }
            }
            "load" if !arg.is_empty() => match std::fs::read_to_string(arg) {
                Ok(text) => {
                    let r = self.rt.borrow_mut().load_source(&text, arg);
                    if let Err(e) = r {
                        self.failed = true;
                        eprint!("{}", e.rendered);
                    }
                }
                Err(e) => {
                    self.failed = true;
                    eprintln!("{arg}: error: cannot read: {e}");
                }
            },
            "vars" => {
                for (n, t, v) in self.rt.borrow().variables() {
                    println!("{n:<16} {t:<10} {v}");
                }
                for f in self.rt.borrow().function_names() {
                    println!("{f:<16} {:<10}", "fn");
                }
                for a in self.rt.borrow().imports.keys() {
                    println!("{a:<16} {:<10}", "module");
                }
            }
            "hooks" => {
                let models = self.rt.borrow().model_hooks();
                let chosen: Vec<_> = models.iter().filter(|(n, _)| arg.is_empty() || n == arg).collect();
                if chosen.is_empty() {
                    self.failed = true;
                    eprintln!("no model variable {arg} (models in scope: {})", models.len());
                }
                for (n, hooks) in chosen {
                    println!("{n}: {} hook points", hooks.len());
                    for h in hooks {
                        println!("  {h}");
                    }
                }
            }
            "cache" => match crate::script::mechint::LAST_CACHE.with(|c| c.borrow().clone()) {
                Some(c) => {
                    for (n, t) in &c.acts {
                        println!("{n:<40} {:?} {}", t.size(), crate::tensor::kind_name(t.kind()));
                    }
                }
                None => println!("no cache yet (run_with_cache makes one)"),
            },
            "reset" => {
                self.rt.borrow_mut().reset();
                println!("session reset");
            }
            _ => {
                self.failed = true;
                eprintln!("unknown command ':{cmd}' (try :help)");
            }
        }
        true
    }

    fn piped(&mut self) {
        let stdin = std::io::stdin();
        let mut buf = String::new();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if buf.is_empty() && line.trim_start().starts_with(':') {
                if !self.handle(&line) {
                    return;
                }
                continue;
            }
            buf.push_str(&line);
            buf.push('\n');
            if self.rt.borrow().is_incomplete(&buf) {
                continue;
            }
            let input = std::mem::take(&mut buf);
            if !self.handle(&input) {
                return;
            }
        }
        if !buf.trim().is_empty() {
            self.handle(&buf);
        }
    }

    fn interactive(&mut self) {
        let config = rustyline::Config::builder()
            .edit_mode(rustyline::EditMode::Emacs)
            .auto_add_history(false)
            .max_history_size(10_000)
            .map(|b| b.build())
            .unwrap_or_default();
        let mut ed: Editor<ShellHelper, DefaultHistory> = match Editor::with_config(config) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("knlp-shell: cannot open the terminal: {e}");
                return;
            }
        };
        ed.set_helper(Some(ShellHelper { rt: self.rt.clone() }));
        let history = history_path();
        if let Some(h) = &history {
            let _ = ed.load_history(h);
        }
        println!("{}", banner());
        loop {
            match ed.readline("knlp> ") {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = ed.add_history_entry(line.as_str());
                        if let Some(h) = &history {
                            let _ = ed.append_history(h);
                        }
                    }
                    crate::interrupt::clear();
                    if !self.handle(&line) {
                        break;
                    }
                }
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => break,
                Err(e) => {
                    eprintln!("knlp-shell: {e}");
                    break;
                }
            }
        }
    }
}

pub fn banner() -> String {
    let cuda = match tch::Cuda::device_count() {
        0 => "CPU only".to_string(),
        n => format!("{n} CUDA device(s)"),
    };
    format!(
        "knlp-shell {} (libtorch {}, {cuda}). :help for help, Ctrl-D to quit.",
        env!("CARGO_PKG_VERSION"),
        crate::shim::torch_version()
    )
}

/// `$KNLP_HISTORY`, else `$XDG_STATE_HOME/knlp/history`, else `~/.local/state/knlp/history`.
fn history_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KNLP_HISTORY") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))?;
    let dir = base.join("knlp");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join("history"))
}

struct ShellHelper {
    rt: Rc<RefCell<Runtime>>,
}

impl Helper for ShellHelper {}
impl Hinter for ShellHelper {
    type Hint = String;
}
impl Highlighter for ShellHelper {}

impl Validator for ShellHelper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        let input = ctx.input();
        if input.trim_start().starts_with(':') || input.trim().is_empty() {
            return Ok(ValidationResult::Valid(None));
        }
        Ok(if self.rt.borrow().is_incomplete(input) {
            ValidationResult::Incomplete
        } else {
            ValidationResult::Valid(None)
        })
    }
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _ctx: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let head = &line[..pos];
        if head.trim_start().starts_with(':') && !head.contains(' ') {
            let cands = COMMANDS.iter().map(|(c, _)| c.split(' ').next().unwrap_or(c).to_string()).collect();
            let s = head.len() - head.trim_start().len();
            return Ok((s, pairs(complete::matching(cands, head.trim_start()))));
        }
        let (start, cands) = complete::complete(&self.rt.borrow(), head);
        Ok((start, pairs(cands)))
    }
}

fn pairs(cands: Vec<String>) -> Vec<Pair> {
    cands.into_iter().map(|c| Pair { display: c.clone(), replacement: c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_hook_names_inside_strings() {
        let rt = Rc::new(RefCell::new(Runtime::new(PathBuf::from("."), Limits::default())));
        let _ = rt
            .borrow_mut()
            .eval_input("let m = gpt2(#{ n_layer: 2, n_head: 2, n_embd: 8, block_size: 8, vocab_size: 16 });")
            .unwrap();
        let h = ShellHelper { rt };
        let hist = rustyline::history::DefaultHistory::new();
        let ctx = Context::new(&hist);
        let line = "m.run_with_hooks(x, #{ \"blocks.1.attn.hook_p";
        let (start, c) = h.complete(line, line.len(), &ctx).unwrap();
        assert_eq!(start, line.rfind('"').unwrap() + 1);
        let got: Vec<&str> = c.iter().map(|p| p.replacement.as_str()).collect();
        assert_eq!(got, ["blocks.1.attn.hook_pattern"]);
        // Outside a string, names complete as before.
        let (_, c) = h.complete("run_with_ca", 11, &ctx).unwrap();
        assert!(c.iter().any(|p| p.replacement == "run_with_cache"));
    }
}
