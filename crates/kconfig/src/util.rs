//! Small helpers that reproduce the Python behaviour kconfiglib relies on
//! (string stripping, `int()` parsing, `hex()`, tab expansion, `glob`,
//! `os.path` joins), so that values and file names come out identical.

use std::collections::HashMap;
use std::path::Path;

/// Python's `str.isspace()` for one character.
pub(crate) fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `str.isspace()`: false for the empty string.
pub(crate) fn str_isspace(s: &str) -> bool {
    !s.is_empty() && s.chars().all(py_isspace)
}

pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

pub(crate) fn py_lstrip(s: &str) -> &str {
    s.trim_start_matches(py_isspace)
}

pub(crate) fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(py_isspace)
}

/// `\s` of an ASCII-mode Python regex.
pub(crate) fn is_re_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Python's `str.expandtabs()` with the default tab size of 8.
pub(crate) fn expand_tabs(s: &str) -> String {
    if !s.contains('\t') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 16);
    let mut col = 0usize;
    for c in s.chars() {
        match c {
            '\t' => {
                let n = 8 - col % 8;
                out.extend(std::iter::repeat_n(' ', n));
                col += n;
            }
            '\n' | '\r' => {
                out.push(c);
                col = 0;
            }
            _ => {
                out.push(c);
                col += 1;
            }
        }
    }
    out
}

/// Number of leading whitespace characters (Python `len(s) - len(s.lstrip())`).
pub(crate) fn indent_chars(s: &str) -> usize {
    s.chars().take_while(|&c| py_isspace(c)).count()
}

/// `s[n:]` with `n` counted in characters.
pub(crate) fn skip_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[i..],
        None => "",
    }
}

/// Python's `int(s, base)` for base 0, 10 and 16. `None` where Python raises
/// `ValueError`, and for values that do not fit in an `i128`.
pub(crate) fn py_int(s: &str, base: u32) -> Option<i128> {
    let t = py_strip(s);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let lower2 = t.get(..2).map(|p| p.to_ascii_lowercase());
    let (radix, digits, prefixed) = match (base, lower2.as_deref()) {
        (16, Some("0x")) | (0, Some("0x")) => (16, &t[2..], true),
        (0, Some("0o")) => (8, &t[2..], true),
        (0, Some("0b")) => (2, &t[2..], true),
        (0, _) => (10, t, false),
        (b, _) => (b, t, false),
    };
    let digits = if prefixed { digits.strip_prefix('_').unwrap_or(digits) } else { digits };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
        return None;
    }
    let mut v: i128 = 0;
    for c in digits.chars() {
        if c == '_' {
            continue;
        }
        let d = c.to_digit(radix)?;
        v = v.checked_mul(radix as i128)?.checked_add(d as i128)?;
    }
    // Base 0 refuses leading zeros on non-zero decimal numbers ("010").
    if base == 0 && !prefixed && digits.starts_with('0') && v != 0 {
        return None;
    }
    Some(if neg { -v } else { v })
}

/// Python's `hex(n)`.
pub(crate) fn py_hex(n: i128) -> String {
    if n < 0 {
        format!("-0x{:x}", n.unsigned_abs())
    } else {
        format!("0x{:x}", n)
    }
}

/// Escapes `\` and `"` as in `.config` files and Kconfig strings.
pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Undoes [`escape`]: a backslash followed by any character (other than a
/// newline) stands for that character.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(&n) = it.peek() {
                if n != '\n' {
                    out.push(n);
                    it.next();
                    continue;
                }
            }
        }
        out.push(c);
    }
    out
}

/// Matches `"((?:[^\\"]|\\.)*)"` at the start of `s`; returns the contents
/// between the quotes (still escaped).
pub(crate) fn match_conf_string(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    if b.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'"' => return Some(&s[1..i]),
            b'\\' => {
                if i + 1 < b.len() && b[i + 1] != b'\n' {
                    // Skip the escaped character, which may be multi-byte.
                    let c = s[i + 1..].chars().next()?;
                    i += 1 + c.len_utf8();
                } else {
                    return None;
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Python's `os.path.join(a, b)` for two parts.
pub(crate) fn path_join(a: &str, b: &str) -> String {
    if b.starts_with('/') || a.is_empty() {
        b.to_string()
    } else if a.ends_with('/') {
        format!("{}{}", a, b)
    } else {
        format!("{}/{}", a, b)
    }
}

/// Python's `os.path.dirname`.
pub(crate) fn dirname(p: &str) -> String {
    let i = p.rfind('/').map(|i| i + 1).unwrap_or(0);
    let head = &p[..i];
    if !head.is_empty() && !head.bytes().all(|b| b == b'/') {
        head.trim_end_matches('/').to_string()
    } else {
        head.to_string()
    }
}

/// Python's `os.path.realpath` (without failing on missing paths).
pub(crate) fn realpath(p: &str) -> String {
    let p = if p.is_empty() { "." } else { p };
    if let Ok(c) = std::fs::canonicalize(p) {
        return c.to_string_lossy().into_owned();
    }
    // Missing path: make it absolute and normalise it lexically.
    let abs = if p.starts_with('/') {
        p.to_string()
    } else {
        let cwd = std::env::current_dir().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        path_join(&cwd, p)
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in abs.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            _ => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The environment seen by the preprocessor and the tools: the process
/// environment, or a fixed map (for embedding and tests).
#[derive(Debug, Clone, Default)]
pub struct Env {
    fixed: Option<HashMap<String, String>>,
}

impl Env {
    /// The process environment.
    pub fn process() -> Env {
        Env { fixed: None }
    }

    /// A fixed set of variables; the process environment is not consulted.
    pub fn fixed(vars: HashMap<String, String>) -> Env {
        Env { fixed: Some(vars) }
    }

    /// The variables of a fixed environment (`None`: the process's).
    pub fn fixed_vars(&self) -> Option<&HashMap<String, String>> {
        self.fixed.as_ref()
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<String> {
        match &self.fixed {
            Some(m) => m.get(name).cloned(),
            None => {
                if name.is_empty() || name.contains('=') || name.contains('\0') {
                    return None;
                }
                std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
            }
        }
    }
}

/// `os.path.expandvars`: replaces `$NAME` and `${NAME}` with the values of
/// set environment variables and leaves the others alone.
pub(crate) fn expandvars(s: &str, env: &Env) -> String {
    if !s.contains('$') {
        return s.to_string();
    }
    let mut path = s.to_string();
    let mut i = 0;
    while let Some(rel) = path[i..].find('$') {
        let start = i + rel;
        let rest = &path[start + 1..];
        let (name, end) = if let Some(inner) = rest.strip_prefix('{') {
            match inner.find('}') {
                Some(close) => (inner[..close].to_string(), start + 1 + 1 + close + 1),
                None => {
                    i = start + 1;
                    continue;
                }
            }
        } else {
            let n = rest.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
            if n == 0 {
                i = start + 1;
                continue;
            }
            (rest[..n].to_string(), start + 1 + n)
        };
        match env.get(&name) {
            Some(v) => {
                let tail = path[end..].to_string();
                path.truncate(start);
                path.push_str(&v);
                i = path.len();
                path.push_str(&tail);
            }
            None => i = end,
        }
    }
    path
}

/// The running kernel's release, for the `$UNAME_RELEASE` compatibility
/// substitution in Kconfig strings.
pub(crate) fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn has_magic(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// `fnmatch.fnmatchcase` for one path component.
pub(crate) fn fnmatch(name: &str, pat: &str) -> bool {
    let n: Vec<char> = name.chars().collect();
    let p: Vec<char> = pat.chars().collect();
    fn class_end(p: &[char], i: usize) -> Option<usize> {
        // p[i] == '['; returns index of the closing ']'.
        let mut j = i + 1;
        if j < p.len() && p[j] == '!' {
            j += 1;
        }
        if j < p.len() && p[j] == ']' {
            j += 1;
        }
        while j < p.len() && p[j] != ']' {
            j += 1;
        }
        (j < p.len()).then_some(j)
    }
    fn class_match(cls: &[char], c: char) -> bool {
        let (neg, cls) = match cls.first() {
            Some('!') => (true, &cls[1..]),
            _ => (false, cls),
        };
        let mut k = 0;
        let mut hit = false;
        while k < cls.len() {
            if k + 2 < cls.len() && cls[k + 1] == '-' {
                if cls[k] <= c && c <= cls[k + 2] {
                    hit = true;
                }
                k += 3;
            } else {
                if cls[k] == c {
                    hit = true;
                }
                k += 1;
            }
        }
        hit != neg
    }
    fn rec(n: &[char], p: &[char]) -> bool {
        let (mut ni, mut pi) = (0, 0);
        while pi < p.len() {
            match p[pi] {
                '*' => {
                    while pi < p.len() && p[pi] == '*' {
                        pi += 1;
                    }
                    if pi == p.len() {
                        return true;
                    }
                    return (ni..=n.len()).any(|k| rec(&n[k..], &p[pi..]));
                }
                '?' => {
                    if ni >= n.len() {
                        return false;
                    }
                    ni += 1;
                    pi += 1;
                }
                '[' => match class_end(p, pi) {
                    Some(end) => {
                        if ni >= n.len() || !class_match(&p[pi + 1..end], n[ni]) {
                            return false;
                        }
                        ni += 1;
                        pi = end + 1;
                    }
                    None => {
                        if ni >= n.len() || n[ni] != '[' {
                            return false;
                        }
                        ni += 1;
                        pi += 1;
                    }
                },
                c => {
                    if ni >= n.len() || n[ni] != c {
                        return false;
                    }
                    ni += 1;
                    pi += 1;
                }
            }
        }
        ni == n.len()
    }
    rec(&n, &p)
}

fn split_path(p: &str) -> (String, String) {
    // os.path.split
    let i = p.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (head, tail) = (&p[..i], &p[i..]);
    let head =
        if !head.is_empty() && !head.bytes().all(|b| b == b'/') { head.trim_end_matches('/') } else { head };
    (head.to_string(), tail.to_string())
}

fn lexists(p: &str) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn isdir(p: &str) -> bool {
    Path::new(if p.is_empty() { "." } else { p }).is_dir()
}

/// Python's `glob.glob(pattern)` (not recursive, hidden files only matched
/// by patterns starting with a dot). Order is unspecified.
pub(crate) fn glob(pattern: &str) -> Vec<String> {
    glob_inner(pattern, false, 0)
}

fn glob_inner(pattern: &str, dironly: bool, depth: usize) -> Vec<String> {
    if depth > 64 {
        return Vec::new();
    }
    let (dir, base) = split_path(pattern);
    if !has_magic(pattern) {
        if !base.is_empty() {
            if lexists(pattern) {
                return vec![pattern.to_string()];
            }
        } else if isdir(&dir) {
            return vec![pattern.to_string()];
        }
        return Vec::new();
    }
    if dir.is_empty() {
        return glob1("", &base, dironly);
    }
    let dirs = if dir != pattern && has_magic(&dir) { glob_inner(&dir, true, depth + 1) } else { vec![dir] };
    let mut out = Vec::new();
    for d in dirs {
        let names = if has_magic(&base) {
            glob1(&d, &base, dironly)
        } else if base.is_empty() {
            if isdir(&d) {
                vec![String::new()]
            } else {
                vec![]
            }
        } else if lexists(&path_join(&d, &base)) {
            vec![base.clone()]
        } else {
            vec![]
        };
        for n in names {
            out.push(path_join(&d, &n));
        }
    }
    out
}

fn glob1(dir: &str, pat: &str, dironly: bool) -> Vec<String> {
    let rd = match std::fs::read_dir(if dir.is_empty() { "." } else { dir }) {
        Ok(rd) => rd,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && !pat.starts_with('.') {
            continue;
        }
        if dironly && !e.path().is_dir() {
            continue;
        }
        if fnmatch(&name, pat) {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_int_parsing() {
        assert_eq!(py_int("0x_1", 16), Some(1));
        assert_eq!(py_int("0x", 16), None);
        assert_eq!(py_int(" 12 ", 10), Some(12));
        assert_eq!(py_int("1_0", 10), Some(10));
        assert_eq!(py_int("01", 0), None);
        assert_eq!(py_int("00", 0), Some(0));
        assert_eq!(py_int("0_0", 0), Some(0));
        assert_eq!(py_int("+0x10", 0), Some(16));
        assert_eq!(py_int("0b1", 16), Some(177));
        assert_eq!(py_int("0o7", 0), Some(7));
        assert_eq!(py_int("-0x10", 16), Some(-16));
        assert_eq!(py_int("_1", 10), None);
        assert_eq!(py_int("1_", 10), None);
        assert_eq!(py_int("\u{a0}12", 10), Some(12));
        assert_eq!(py_int("0b", 0), None);
        assert_eq!(py_int("", 10), None);
        assert_eq!(py_int("12a", 10), None);
    }

    #[test]
    fn hex_formatting() {
        assert_eq!(py_hex(255), "0xff");
        assert_eq!(py_hex(-5), "-0x5");
        assert_eq!(py_hex(0), "0x0");
    }

    #[test]
    fn string_escaping_round_trips() {
        for s in ["", "plain", "a\"b", "back\\slash", "\\\"", "tab\there", "ünïcode \"q\""] {
            assert_eq!(unescape(&escape(s)), s);
        }
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
        assert_eq!(unescape("\\n\\x"), "nx");
        assert_eq!(unescape("end\\"), "end\\");
    }

    #[test]
    fn conf_string_matching() {
        assert_eq!(match_conf_string("\"abc\""), Some("abc"));
        assert_eq!(match_conf_string("\"a\\\"b\" trailing"), Some("a\\\"b"));
        assert_eq!(match_conf_string("\"unterminated"), None);
        assert_eq!(match_conf_string("noquote"), None);
        assert_eq!(match_conf_string("\"ends in backslash\\"), None);
    }

    #[test]
    fn tabs_expand_by_column() {
        assert_eq!(expand_tabs("\tx"), "        x");
        assert_eq!(expand_tabs("ab\tx"), "ab      x");
        assert_eq!(expand_tabs("no tabs"), "no tabs");
    }

    #[test]
    fn path_helpers_match_python() {
        assert_eq!(dirname("Kconfig"), "");
        assert_eq!(dirname("a/b/Kconfig"), "a/b");
        assert_eq!(dirname("/x"), "/");
        assert_eq!(path_join("", "x"), "x");
        assert_eq!(path_join("a", "/x"), "/x");
        assert_eq!(path_join("a/", "x"), "a/x");
        assert_eq!(path_join("a", "x"), "a/x");
    }

    #[test]
    fn fnmatch_patterns() {
        assert!(fnmatch("Kconfig.foo", "Kconfig.*"));
        assert!(fnmatch("abc", "a?c"));
        assert!(fnmatch("abc", "[a-c]bc"));
        assert!(!fnmatch("abc", "[!a]bc"));
        assert!(fnmatch("[x", "[x"));
        assert!(!fnmatch("abd", "abc"));
    }

    #[test]
    fn expandvars_like_python() {
        let env = Env::fixed(HashMap::from([("A".to_string(), "1".to_string())]));
        assert_eq!(expandvars("x$A-${A}-$B-${}-$", &env), "x1-1-$B-${}-$");
    }
}
