//! Script errors as `file:line:col: error: message`, the source line and a
//! caret, followed by the call chain (functions, imported modules).
use std::collections::HashMap;

use rhai::{EvalAltResult, Position};

use super::api::DocEntry;

/// Where an error happened and what to tell the user.
#[derive(Debug, Clone)]
pub struct Located {
    pub source: String,
    pub line: Option<usize>,
    pub col: Option<usize>,
    pub message: String,
    pub trace: Vec<String>,
}

/// What the error formatter needs to know about the run.
pub struct ErrorContext<'a> {
    pub sources: &'a HashMap<String, String>,
    pub docs: &'a [DocEntry],
    pub max_operations: u64,
    pub timeout_secs: f64,
}

/// The kind of ending a script error represents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `exit(code)` was called.
    Exit(i32),
    /// Ctrl-C.
    Interrupted,
    /// Any other error.
    Failed,
}

pub fn ending(err: &EvalAltResult) -> Ending {
    match innermost(err) {
        EvalAltResult::Exit(v, _) => Ending::Exit(v.as_int().unwrap_or(0) as i32),
        EvalAltResult::ErrorTerminated(v, _) if v.to_string() == "interrupted" => Ending::Interrupted,
        EvalAltResult::ErrorTerminated(v, _) if v.to_string().starts_with("exit:") => {
            Ending::Exit(v.to_string()[5..].parse().unwrap_or(1))
        }
        _ => Ending::Failed,
    }
}

fn innermost(err: &EvalAltResult) -> &EvalAltResult {
    match err {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) | EvalAltResult::ErrorInModule(_, inner, _) => {
            innermost(inner)
        }
        e => e,
    }
}

/// Walk nested errors down to the one that happened first.
pub fn locate(err: &EvalAltResult, source: &str, ctx: &ErrorContext) -> Located {
    let mut trace = Vec::new();
    let mut src = source.to_string();
    let mut cur = err;
    let mut last_pos = Position::NONE;
    loop {
        match cur {
            EvalAltResult::ErrorInFunctionCall(name, fsrc, inner, pos) => {
                let what = if name.starts_with("anon$") {
                    "closure".to_string()
                } else {
                    format!("function '{name}'")
                };
                trace.push(format!("in {what} called at {}", at(&src, *pos)));
                if !pos.is_none() {
                    last_pos = *pos;
                }
                if !fsrc.is_empty() {
                    src = fsrc.clone();
                }
                cur = inner;
            }
            EvalAltResult::ErrorInModule(name, inner, pos) => {
                trace.push(format!("in module '{name}' imported at {}", at(&src, *pos)));
                if !pos.is_none() {
                    last_pos = *pos;
                }
                src = name.clone();
                cur = inner;
            }
            leaf => {
                let pos = if leaf.position().is_none() { last_pos } else { leaf.position() };
                trace.reverse();
                return Located {
                    source: src,
                    line: pos.line(),
                    col: pos.position(),
                    message: message(leaf, ctx),
                    trace,
                };
            }
        }
    }
}

fn at(src: &str, pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{src}:{l}:{c}"),
        (Some(l), None) => format!("{src}:{l}"),
        _ => src.to_string(),
    }
}

/// The user-facing message of a leaf error, without Rhai's position suffix.
pub fn message(err: &EvalAltResult, ctx: &ErrorContext) -> String {
    let msg = match err {
        EvalAltResult::ErrorRuntime(d, _) => d.to_string(),
        EvalAltResult::ErrorTooManyOperations(_) => format!(
            "script stopped after {} operations (a runaway loop?); raise the limit with --max-operations N, 0 for none",
            ctx.max_operations
        ),
        EvalAltResult::ErrorTerminated(v, _) => match v.to_string().as_str() {
            "interrupted" => "interrupted (Ctrl-C)".to_string(),
            "timeout" => format!("script stopped after the --timeout of {} s", ctx.timeout_secs),
            other => format!("script terminated: {other}"),
        },
        EvalAltResult::ErrorFunctionNotFound(sig, _) => function_not_found(sig, ctx.docs),
        EvalAltResult::ErrorStackOverflow(_) => {
            "call stack too deep (runaway recursion?); raise the limit with --max-call-levels N".to_string()
        }
        EvalAltResult::ErrorParsing(p, _) => format!("syntax error: {p}"),
        EvalAltResult::ErrorModuleNotFound(m, _) => {
            format!("module '{m}' not found (imports resolve from the script's folder, then stdlib/)")
        }
        other => strip_position(&other.to_string()),
    };
    script_type_names(&msg)
}

fn strip_position(s: &str) -> String {
    match s.rfind(" (line ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s.to_string(),
    }
}

/// Rhai reports Rust type names; show the script's names instead.
pub fn script_type_names(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let w = match word.as_str() {
            "i64" => "int",
            "f64" => "float",
            "ImmutableString" | "alloc::string::String" => "string",
            w => w,
        };
        out.push_str(w);
        word.clear();
    };
    for ch in s.chars() {
        if ch.is_alphanumeric() || ch == '_' || ch == ':' {
            word.push(ch);
        } else {
            flush(&mut word, &mut out);
            out.push(ch);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn function_not_found(sig: &str, docs: &[DocEntry]) -> String {
    let name = sig.split([' ', '(']).next().unwrap_or(sig).trim();
    let mut msg = format!("no function matches {}", script_type_names(sig.trim()));
    let known: Vec<&DocEntry> = docs.iter().filter(|d| d.name == name).collect();
    if !known.is_empty() {
        msg.push_str("; available:");
        for d in known.iter().take(8) {
            msg.push_str(&format!("\n    {}", d.signature));
        }
        if known.len() > 8 {
            msg.push_str(&format!("\n    ... ({} more; see `knlp doc {name}`)", known.len() - 8));
        }
    }
    msg
}

/// Render a located error with its source line and a caret.
pub fn render(loc: &Located, sources: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let place = match (loc.line, loc.col) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}", loc.source),
        (Some(l), None) => format!("{}:{l}", loc.source),
        _ => loc.source.clone(),
    };
    out.push_str(&format!("{place}: error: {}\n", crate::tensor::shorten_message(&loc.message)));
    if let (Some(l), Some(text)) = (loc.line, sources.get(&loc.source)) {
        if let Some(src_line) = text.lines().nth(l - 1) {
            let num = l.to_string();
            out.push_str(&format!(" {num} | {}\n", src_line.replace('\t', " ")));
            if let Some(c) = loc.col {
                out.push_str(&format!(" {} | {}^\n", " ".repeat(num.len()), " ".repeat(c.saturating_sub(1))));
            }
        }
    }
    for t in &loc.trace {
        out.push_str(&format!("  {t}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_scripty() {
        assert_eq!(script_type_names("reshape (Tensor, f64)"), "reshape (Tensor, float)");
        assert_eq!(script_type_names("foo (i64, ImmutableString)"), "foo (int, string)");
        assert_eq!(script_type_names("i64x f64"), "i64x float");
    }

    #[test]
    fn renders_caret() {
        let mut sources = HashMap::new();
        sources.insert("a.rhai".to_string(), "let x = 1;\nlet y = x.bad();\n".to_string());
        let loc = Located {
            source: "a.rhai".into(),
            line: Some(2),
            col: Some(11),
            message: "boom".into(),
            trace: vec![],
        };
        let r = render(&loc, &sources);
        assert_eq!(r, "a.rhai:2:11: error: boom\n 2 | let y = x.bad();\n   |           ^\n");
    }
}
