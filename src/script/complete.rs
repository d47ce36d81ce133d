//! Completion candidates for a partial input, shared by `knlp-shell` and the
//! Jupyter kernel: functions, methods after a `.`, variables, script
//! functions, `import` aliases and their members, keywords, and hook names
//! inside a string literal.
use super::{api, Runtime};

pub const KEYWORDS: &[&str] = &[
    "let", "const", "fn", "if", "else", "for", "in", "while", "loop", "break", "continue", "return", "throw",
    "try", "catch", "import", "as", "true", "false", "print", "switch",
];

/// Where the word before the cursor starts in `head` (the input up to the
/// cursor, a byte offset) and the sorted, distinct candidates for it.
pub fn complete(rt: &Runtime, head: &str) -> (usize, Vec<String>) {
    // Inside a string literal: hook names of the models in scope.
    let quotes = head.char_indices().filter(|&(i, c)| c == '"' && !head[..i].ends_with('\\')).count();
    if quotes % 2 == 1 {
        let q = head.rfind('"').map_or(0, |i| i + 1);
        let names: Vec<String> = rt.model_hooks().into_iter().flat_map(|(_, h)| h).collect();
        return (q, matching(names, &head[q..]));
    }
    let start = head.rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).map_or(0, |i| i + 1);
    let word = &head[start..];
    let after_dot = head[..start].ends_with('.');
    let mut cands: Vec<String> = Vec::new();
    if let Some((alias, _)) = word.split_once("::") {
        if let Some(members) = rt.imports.get(alias) {
            cands = members.iter().map(|m| format!("{alias}::{m}")).collect();
        }
    } else if after_dot {
        cands = rt.docs.iter().filter(|d| d.signature.contains('.')).map(|d| d.name.clone()).collect();
    } else {
        cands.extend(api::names(&rt.docs));
        cands.extend(rt.variables().into_iter().map(|(n, _, _)| n));
        cands.extend(rt.function_names());
        cands.extend(rt.imports.keys().map(|a| format!("{a}::")));
        cands.extend(KEYWORDS.iter().map(|k| k.to_string()));
    }
    (start, matching(cands, word))
}

/// Candidates starting with `prefix`, sorted and distinct.
pub fn matching(mut cands: Vec<String>, prefix: &str) -> Vec<String> {
    cands.retain(|c| c.starts_with(prefix));
    cands.sort();
    cands.dedup();
    cands
}

/// The identifier (with `::` paths) around byte offset `pos` of `code`, for
/// help on the name under the cursor.
pub fn word_at(code: &str, pos: usize) -> Option<&str> {
    let pos = pos.min(code.len());
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let start = code[..pos].rfind(|c: char| !is_word(c)).map_or(0, |i| i + 1);
    let end = code[pos..].find(|c: char| !is_word(c)).map_or(code.len(), |i| pos + i);
    let w = code[start..end].trim_matches(':');
    (!w.is_empty()).then_some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_word_under_the_cursor() {
        assert_eq!(word_at("let x = zeros([2]);", 10), Some("zeros"));
        assert_eq!(word_at("m.run_with_cache(x)", 4), Some("run_with_cache"));
        assert_eq!(word_at("   ", 1), None);
    }
}
