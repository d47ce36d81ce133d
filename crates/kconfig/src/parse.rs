//! Kconfig tokenizer, preprocessor and parser: a line-by-line port of
//! kconfiglib's `_tokenize`, `_expand_*`, `_parse_block` and `_parse_props`,
//! so that the same inputs give the same menu tree (and the same errors).

use std::sync::Arc;

use crate::error::{ErrorKind, KconfigError};
use crate::model::*;
use crate::util::*;

/// How deeply blocks (menus, ifs, choices, sourced files) may nest. Far
/// beyond real trees; keeps hostile input from exhausting the stack.
const MAX_BLOCK_DEPTH: usize = 200;
/// How deeply expressions may nest (parentheses, `!`, chains of `&&`/`||`).
const MAX_EXPR_DEPTH: usize = 1000;
/// Nested macro expansions.
const MAX_MACRO_DEPTH: usize = 200;
/// Upper bound on the size of a line after macro expansion.
const MAX_EXPANSION: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kw {
    AllnoconfigY,
    Bool,
    Choice,
    Comment,
    Config,
    Default,
    DefconfigList,
    DefBool,
    DefHex,
    DefInt,
    DefString,
    DefTristate,
    Depends,
    Endchoice,
    Endif,
    Endmenu,
    Env,
    Help,
    Hex,
    If,
    Imply,
    Int,
    Mainmenu,
    Menu,
    Menuconfig,
    Modules,
    On,
    Option,
    Optional,
    Orsource,
    Osource,
    Prompt,
    Range,
    Rsource,
    Select,
    Source,
    String,
    Tristate,
    Visible,
}

fn keyword(s: &str) -> Option<Kw> {
    Some(match s {
        "---help---" | "help" => Kw::Help,
        "allnoconfig_y" => Kw::AllnoconfigY,
        "bool" | "boolean" => Kw::Bool,
        "choice" => Kw::Choice,
        "comment" => Kw::Comment,
        "config" => Kw::Config,
        "def_bool" => Kw::DefBool,
        "def_hex" => Kw::DefHex,
        "def_int" => Kw::DefInt,
        "def_string" => Kw::DefString,
        "def_tristate" => Kw::DefTristate,
        "default" => Kw::Default,
        "defconfig_list" => Kw::DefconfigList,
        "depends" => Kw::Depends,
        "endchoice" => Kw::Endchoice,
        "endif" => Kw::Endif,
        "endmenu" => Kw::Endmenu,
        "env" => Kw::Env,
        "grsource" | "orsource" => Kw::Orsource,
        "gsource" | "osource" => Kw::Osource,
        "hex" => Kw::Hex,
        "if" => Kw::If,
        "imply" => Kw::Imply,
        "int" => Kw::Int,
        "mainmenu" => Kw::Mainmenu,
        "menu" => Kw::Menu,
        "menuconfig" => Kw::Menuconfig,
        "modules" => Kw::Modules,
        "on" => Kw::On,
        "option" => Kw::Option,
        "optional" => Kw::Optional,
        "prompt" => Kw::Prompt,
        "range" => Kw::Range,
        "rsource" => Kw::Rsource,
        "select" => Kw::Select,
        "source" => Kw::Source,
        "string" => Kw::String,
        "tristate" => Kw::Tristate,
        "visible" => Kw::Visible,
        _ => return None,
    })
}

/// Keywords after which a quoted or bare word is a string, not a symbol.
fn is_string_lex(k: Kw) -> bool {
    matches!(
        k,
        Kw::Bool
            | Kw::Choice
            | Kw::Comment
            | Kw::Hex
            | Kw::Int
            | Kw::Mainmenu
            | Kw::Menu
            | Kw::Orsource
            | Kw::Osource
            | Kw::Prompt
            | Kw::Rsource
            | Kw::Source
            | Kw::String
            | Kw::Tristate
    )
}

fn type_of_kw(k: Kw) -> Option<SymbolType> {
    Some(match k {
        Kw::Bool => SymbolType::Bool,
        Kw::Tristate => SymbolType::Tristate,
        Kw::Int => SymbolType::Int,
        Kw::Hex => SymbolType::Hex,
        Kw::String => SymbolType::String,
        _ => return None,
    })
}

fn def_type_of_kw(k: Kw) -> Option<SymbolType> {
    Some(match k {
        Kw::DefBool => SymbolType::Bool,
        Kw::DefTristate => SymbolType::Tristate,
        Kw::DefInt => SymbolType::Int,
        Kw::DefHex => SymbolType::Hex,
        Kw::DefString => SymbolType::String,
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Kw(Kw),
    Sym(SymId),
    Str(String),
    And,
    Or,
    Not,
    Rel(RelOp),
    LParen,
    RParen,
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'/' | b'.' | b'-')
}

type Builtin = for<'p, 'k> fn(&'p mut Parser<'k>, &[String]) -> Result<String, KconfigError>;

/// Built-in preprocessor functions: name, fewest and most arguments.
const BUILTIN_FUNCTIONS: [(&str, usize, usize, Builtin); 7] = [
    ("error-if", 2, 2, |p, a| p.fn_error_if(a)),
    ("filename", 0, 0, |p, a| p.fn_filename(a)),
    ("if", 2, 3, |p, a| p.fn_if(a)),
    ("info", 0, 1, |p, a| p.fn_info(a)),
    ("lineno", 0, 0, |p, a| p.fn_lineno(a)),
    ("shell", 1, 1, |p, a| p.fn_shell(a)),
    ("warning-if", 2, 2, |p, a| p.fn_warning_if(a)),
];

/// Calls deeper than this of one user-defined function are taken to be
/// infinite recursion (kconfiglib's bound).
const MAX_FUNCTION_RECURSION: usize = 100;

/// One Kconfig file being read, with newlines normalised like Python's
/// universal-newlines mode.
struct SrcFile {
    text: String,
    pos: usize,
}

impl SrcFile {
    fn readline(&mut self) -> String {
        if self.pos >= self.text.len() {
            return String::new();
        }
        let end = match self.text[self.pos..].find('\n') {
            Some(i) => self.pos + i + 1,
            None => self.text.len(),
        };
        let line = self.text[self.pos..end].to_string();
        self.pos = end;
        line
    }
}

type IncludePath = Arc<Vec<(Arc<str>, usize)>>;

pub(crate) struct Parser<'a> {
    kc: &'a mut Kconfig,
    cur: SrcFile,
    stack: Vec<(IncludePath, SrcFile)>,
    include_path: IncludePath,
    filename: Arc<str>,
    linenr: usize,
    tokens: Vec<Tok>,
    tokens_i: usize,
    reuse_tokens: bool,
    line: String,
    uname: Option<String>,
    depth: usize,
    expr_depth: usize,
    macro_depth: usize,
}

/// Reads a file as UTF-8 with universal newlines.
pub(crate) fn read_text(path: &str, shown_name: &str) -> Result<String, ReadError> {
    let bytes = std::fs::read(path).map_err(ReadError::Io)?;
    decode(bytes, shown_name).map_err(ReadError::Decode)
}

pub(crate) enum ReadError {
    Io(std::io::Error),
    Decode(KconfigError),
}

/// Decodes UTF-8, naming the line of the first bad byte on failure, and
/// normalises `\r\n` and `\r` to `\n`.
pub(crate) fn decode(bytes: Vec<u8>, shown_name: &str) -> Result<String, KconfigError> {
    match String::from_utf8(bytes) {
        Ok(s) => Ok(normalize_newlines(s)),
        Err(e) => {
            let upto = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            let line = 1 + bytes[..upto].iter().filter(|&&b| b == b'\n').count();
            Err(KconfigError::new(
                ErrorKind::Encoding,
                shown_name,
                line,
                format!("malformed UTF-8 in '{}' (byte offset {})", shown_name, upto),
            ))
        }
    }
}

fn normalize_newlines(s: String) -> String {
    if !s.contains('\r') {
        return s;
    }
    s.replace("\r\n", "\n").replace('\r', "\n")
}

/// `errno.errorcode[e.errno]: e.strerror` as kconfiglib prints it.
pub(crate) fn io_reason(e: &std::io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(1) => "EPERM",
        Some(2) => "ENOENT",
        Some(5) => "EIO",
        Some(13) => "EACCES",
        Some(20) => "ENOTDIR",
        Some(21) => "EISDIR",
        Some(24) => "EMFILE",
        Some(36) => "ENAMETOOLONG",
        Some(40) => "ELOOP",
        _ => "",
    };
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    if name.is_empty() {
        text
    } else {
        format!("{}: {}", name, text)
    }
}

impl<'a> Parser<'a> {
    pub(crate) fn new(kc: &'a mut Kconfig, filename: &str, text: String) -> Parser<'a> {
        Parser {
            kc,
            cur: SrcFile { text, pos: 0 },
            stack: Vec::new(),
            include_path: Arc::new(Vec::new()),
            filename: Arc::from(filename),
            linenr: 0,
            tokens: Vec::new(),
            tokens_i: 1,
            reuse_tokens: false,
            line: String::new(),
            uname: None,
            depth: 0,
            expr_depth: 0,
            macro_depth: 0,
        }
    }

    /// Parses `s` as a condition (for `Kconfig::eval_string`).
    pub(crate) fn parse_expression(&mut self, s: &str) -> Result<Expr, KconfigError> {
        self.linenr = 1;
        self.tokens = self.tokenize(&format!("if {}", s))?;
        self.line = s.to_string();
        self.tokens_i = 1;
        self.expect_expr_and_eol()
    }

    /// Parses the whole tree below `top`.
    pub(crate) fn parse_top(&mut self, top: NodeId) -> Result<(), KconfigError> {
        let last = self.parse_block(None, top, top)?;
        self.kc.nodes[last].next = None;
        let first = self.kc.nodes[top].next;
        self.kc.nodes[top].list = first;
        self.kc.nodes[top].next = None;
        Ok(())
    }

    // ----- errors and warnings -----

    fn err(&self, kind: ErrorKind, msg: String) -> KconfigError {
        KconfigError::new(kind, &*self.filename, self.linenr, msg)
    }

    fn parse_error(&self, msg: &str) -> KconfigError {
        self.err(ErrorKind::Parse, format!("error: couldn't parse '{}': {}", py_strip(&self.line), msg))
    }

    fn trailing_tokens_error(&self) -> KconfigError {
        self.parse_error("extra tokens at end of line")
    }

    fn warn_here(&self, msg: String) {
        self.kc.warn_msg(msg, Some((&self.filename, self.linenr)));
    }

    // ----- files -----

    fn readline(&mut self) -> String {
        self.cur.readline()
    }

    fn enter_file(&mut self, path: &str) -> Result<(), KconfigError> {
        let rel: String = match path.strip_prefix(self.kc.srctree_prefix.as_str()) {
            Some(r) => r.to_string(),
            None => path.to_string(),
        };
        self.kc.kconfig_filenames.push(rel.clone());
        let mut new_path: Vec<(Arc<str>, usize)> = (*self.include_path).clone();
        new_path.push((self.filename.clone(), self.linenr));
        if new_path.iter().any(|(name, _)| **name == *rel) {
            let chain: Vec<String> = new_path.iter().map(|(n, l)| format!("{}:{}", n, l)).collect();
            return Err(self.err(
                ErrorKind::Parse,
                format!(
                    "recursive 'source' of '{}' detected. Check that environment variables are set \
                     correctly.\nInclude path:\n{}",
                    rel,
                    chain.join("\n")
                ),
            ));
        }
        if self.stack.len() >= MAX_BLOCK_DEPTH {
            return Err(self.err(ErrorKind::Parse, format!("'source' of '{}' nested too deeply", rel)));
        }
        let text = match read_text(path, &rel) {
            Ok(t) => t,
            Err(ReadError::Io(e)) => {
                return Err(self.err(
                    ErrorKind::Io,
                    format!("Could not open '{}' (in '{}') ({})", path, py_strip(&self.line), io_reason(&e)),
                ))
            }
            Err(ReadError::Decode(e)) => return Err(e),
        };
        let old = std::mem::replace(&mut self.cur, SrcFile { text, pos: 0 });
        let old_path = std::mem::replace(&mut self.include_path, Arc::new(new_path));
        self.stack.push((old_path, old));
        self.filename = Arc::from(rel.as_str());
        self.linenr = 0;
        Ok(())
    }

    fn leave_file(&mut self) {
        if let Some((name, line)) = self.include_path.last() {
            self.filename = name.clone();
            self.linenr = *line;
        }
        if let Some((path, file)) = self.stack.pop() {
            self.include_path = path;
            self.cur = file;
        }
    }

    fn next_line(&mut self) -> Result<bool, KconfigError> {
        if self.reuse_tokens {
            self.reuse_tokens = false;
            self.tokens_i = 1;
            return Ok(true);
        }
        let mut line = self.readline();
        if line.is_empty() {
            return Ok(false);
        }
        self.linenr += 1;
        while line.ends_with("\\\n") {
            line.truncate(line.len() - 2);
            let more = self.readline();
            line.push_str(&more);
            self.linenr += 1;
        }
        self.tokens = self.tokenize(&line)?;
        self.tokens_i = 1;
        Ok(true)
    }

    fn line_after_help(&mut self, mut line: String) -> Result<(), KconfigError> {
        while line.ends_with("\\\n") {
            line.truncate(line.len() - 2);
            let more = self.readline();
            line.push_str(&more);
            self.linenr += 1;
        }
        self.tokens = self.tokenize(&line)?;
        self.tokens_i = 1;
        self.reuse_tokens = true;
        Ok(())
    }

    // ----- tokenizer -----

    fn tokenize(&mut self, line: &str) -> Result<Vec<Tok>, KconfigError> {
        self.line = line.to_string();
        let mut s = line.to_string();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() && is_re_space(b[i]) {
            i += 1;
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'$' | b'-')) {
            i += 1;
        }
        if i == start {
            if str_isspace(&s) || py_lstrip(&s).starts_with('#') {
                return Ok(Vec::new());
            }
            return Err(self.parse_error("unknown token at start of line"));
        }
        let word = &s[start..i];
        while i < b.len() && is_re_space(b[i]) {
            i += 1;
        }
        let Some(first) = keyword(word) else {
            // Old C tools accepted things like "--help--".
            if s.trim_matches([' ', '\t', '\n', '-']) == "help" {
                return Ok(vec![Tok::Kw(Kw::Help)]);
            }
            // Not a keyword: a preprocessor assignment (or a bare macro).
            self.parse_assignment(&s)?;
            return Ok(Vec::new());
        };

        let mut tokens = vec![Tok::Kw(first)];
        // The previous token, as far as the string/symbol decision needs it.
        let mut prev_kw: Option<Kw> = Some(first);
        while i < s.len() {
            let b = s.as_bytes();
            let mut j = i;
            while j < b.len() && is_id_byte(b[j]) {
                j += 1;
            }
            if j > i {
                let name = s[i..j].to_string();
                let mut end = j;
                while end < b.len() && is_re_space(b[end]) {
                    end += 1;
                }
                if let Some(k) = keyword(&name) {
                    tokens.push(Tok::Kw(k));
                    prev_kw = Some(k);
                    i = end;
                } else if !prev_kw.is_some_and(is_string_lex) {
                    let name = if name.contains('$') {
                        let (n, ns, ni) = self.expand_name(s, i)?;
                        s = ns;
                        i = ni;
                        n
                    } else {
                        i = end;
                        name
                    };
                    let id = match name.as_str() {
                        "n" => N,
                        "m" => M,
                        "y" => Y,
                        _ => self.kc.lookup_sym(&name),
                    };
                    tokens.push(Tok::Sym(id));
                    prev_kw = None;
                } else {
                    // Missing quotes, e.g. `menu title` or `choice NAME`.
                    if prev_kw != Some(Kw::Choice) {
                        self.warn_here(format!(
                            "style: quotes recommended around '{}' in '{}'",
                            name,
                            py_strip(&self.line)
                        ));
                    }
                    tokens.push(Tok::Str(name));
                    prev_kw = None;
                    i = end;
                }
                continue;
            }

            let c = s[i..].chars().next().unwrap_or('\0');
            let tok = if c == '"' || c == '\'' {
                let (ns, end_i) = self.expand_str(s, i)?;
                s = ns;
                let raw = &s[i + 1..end_i - 1];
                let raw = if raw.contains("$UNAME_RELEASE") {
                    let u = self.uname.get_or_insert_with(uname_release).clone();
                    raw.replace("$UNAME_RELEASE", &u)
                } else {
                    raw.to_string()
                };
                let val = expandvars(&raw, &self.kc.env);
                i = end_i;
                if prev_kw.is_some_and(is_string_lex) || first == Kw::Option {
                    Tok::Str(val)
                } else {
                    Tok::Sym(self.kc.lookup_const_sym(&val))
                }
            } else {
                let rest = &s[i..];
                let (t, n) = if rest.starts_with("&&") {
                    (Tok::And, 2)
                } else if rest.starts_with("||") {
                    (Tok::Or, 2)
                } else if c == '=' {
                    (Tok::Rel(RelOp::Eq), 1)
                } else if rest.starts_with("!=") {
                    (Tok::Rel(RelOp::Ne), 2)
                } else if c == '!' {
                    (Tok::Not, 1)
                } else if c == '(' {
                    (Tok::LParen, 1)
                } else if c == ')' {
                    (Tok::RParen, 1)
                } else if c == '#' {
                    break;
                } else if rest.starts_with("<=") {
                    (Tok::Rel(RelOp::Le), 2)
                } else if c == '<' {
                    (Tok::Rel(RelOp::Lt), 1)
                } else if rest.starts_with(">=") {
                    (Tok::Rel(RelOp::Ge), 2)
                } else if c == '>' {
                    (Tok::Rel(RelOp::Gt), 1)
                } else {
                    return Err(self.parse_error("unknown tokens in line"));
                };
                i += n;
                t
            };
            while i < s.len() {
                match s[i..].chars().next() {
                    Some(ch) if py_isspace(ch) => i += ch.len_utf8(),
                    _ => break,
                }
            }
            tokens.push(tok);
            prev_kw = None;
        }
        Ok(tokens)
    }

    // ----- preprocessor -----

    fn parse_assignment(&mut self, line: &str) -> Result<(), KconfigError> {
        let mut s = py_lstrip(line).to_string();
        let mut i = 0;
        loop {
            let b = s.as_bytes();
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-') {
                i += 1;
            }
            if s[i..].starts_with("$(") {
                let (ns, ni) = self.expand_macro(s, i, &[])?;
                s = ns;
                i = ni;
            } else {
                break;
            }
        }
        if str_isspace(&s) {
            // A bare macro on a line that expanded to nothing.
            return Ok(());
        }
        let name = s[..i].to_string();
        let b = s.as_bytes();
        let mut j = i;
        while j < b.len() && is_re_space(b[j]) {
            j += 1;
        }
        let rest = &s[j..];
        let op = if rest.starts_with('=') {
            "="
        } else if rest.starts_with(":=") {
            ":="
        } else if rest.starts_with("+=") {
            "+="
        } else {
            return Err(self.parse_error("syntax error"));
        };
        j += op.len();
        while j < b.len() && is_re_space(b[j]) {
            j += 1;
        }
        let val = match s[j..].find('\n') {
            Some(k) => s[j..j + k].to_string(),
            None => s[j..].to_string(),
        };

        let mut op = op;
        if !self.kc.variables.contains_key(&name) {
            self.kc.variables.insert(
                name.clone(),
                Variable { value: String::new(), is_recursive: false, n_expansions: 0 },
            );
            // += on an undefined variable defines a recursive one.
            if op == "+=" {
                op = "=";
            }
        }
        match op {
            "=" => {
                let var = self.kc.variables.get_mut(&name).expect("just inserted");
                var.is_recursive = true;
                var.value = val;
            }
            ":=" => {
                let v = self.expand_whole(val, &[])?;
                let var = self.kc.variables.get_mut(&name).expect("just inserted");
                var.is_recursive = false;
                var.value = v;
            }
            _ => {
                let recursive = self.kc.variables[&name].is_recursive;
                let add = if recursive { val } else { self.expand_whole(val, &[])? };
                let var = self.kc.variables.get_mut(&name).expect("just inserted");
                var.value.push(' ');
                var.value.push_str(&add);
            }
        }
        Ok(())
    }

    fn expand_whole(&mut self, mut s: String, args: &[String]) -> Result<String, KconfigError> {
        let mut i = 0;
        while let Some(k) = s.get(i..).and_then(|r| r.find("$(")) {
            let (ns, ni) = self.expand_macro(s, i + k, args)?;
            s = ns;
            i = ni;
        }
        Ok(s)
    }

    /// Expands a symbol name at `i`; returns (name, new line, index after
    /// the name and any whitespace).
    fn expand_name(&mut self, s: String, i: usize) -> Result<(String, String, usize), KconfigError> {
        let (s, end) = self.expand_name_iter(s, i)?;
        let name = s[i..end].to_string();
        if py_strip(&name).is_empty() {
            return Err(self.parse_error("macro expanded to blank string"));
        }
        let mut end = end;
        while end < s.len() {
            match s[end..].chars().next() {
                Some(ch) if py_isspace(ch) => end += ch.len_utf8(),
                _ => break,
            }
        }
        Ok((name, s, end))
    }

    fn expand_name_iter(&mut self, mut s: String, mut i: usize) -> Result<(String, usize), KconfigError> {
        loop {
            let b = s.as_bytes();
            let mut k = i;
            while k < b.len() {
                if b[k] == b'$' && b.get(k + 1) == Some(&b'(') {
                    break;
                }
                if !is_id_byte(b[k]) {
                    return Ok((s, k));
                }
                k += 1;
            }
            if k >= b.len() {
                return Ok((s, k));
            }
            let (ns, ni) = self.expand_macro(s, k, &[])?;
            s = ns;
            i = ni;
        }
    }

    /// Expands a quoted string starting at `i` (backslash escapes and
    /// macros); returns the new line and the index after the closing quote.
    fn expand_str(&mut self, mut s: String, i: usize) -> Result<(String, usize), KconfigError> {
        let quote = s.as_bytes()[i];
        let mut i = i + 1;
        loop {
            let b = s.as_bytes();
            let mut k = i;
            let mut found = None;
            while k < b.len() {
                match b[k] {
                    b'"' | b'\'' | b'\\' => {
                        found = Some(k);
                        break;
                    }
                    b'$' if b.get(k + 1) == Some(&b'(') => {
                        found = Some(k);
                        break;
                    }
                    _ => k += 1,
                }
            }
            let Some(k) = found else {
                return Err(self.parse_error("unterminated string"));
            };
            match b[k] {
                q if q == quote => return Ok((s, k + 1)),
                b'\\' => {
                    s.remove(k);
                    // Skip the escaped character so that '\$(' stays literal.
                    i = k + s[k..].chars().next().map(|c| c.len_utf8()).unwrap_or(1);
                }
                b'$' => {
                    let (ns, ni) = self.expand_macro(s, k, &[])?;
                    s = ns;
                    i = ni;
                }
                _ => i = k + 1,
            }
        }
    }

    /// Expands the macro `$(...)` starting at `i`. `args` holds the
    /// arguments of the enclosing function call (`$(0)`, `$(1)` ...).
    fn expand_macro(
        &mut self,
        s: String,
        i: usize,
        args: &[String],
    ) -> Result<(String, usize), KconfigError> {
        self.macro_depth += 1;
        let r = self.expand_macro_inner(s, i, args);
        self.macro_depth -= 1;
        r
    }

    fn expand_macro_inner(
        &mut self,
        mut s: String,
        i: usize,
        args: &[String],
    ) -> Result<(String, usize), KconfigError> {
        if self.macro_depth > MAX_MACRO_DEPTH {
            return Err(self.err(ErrorKind::Preprocessor, "macros nested too deeply".to_string()));
        }
        let prefix = s[..i].to_string();
        let mut i = i + 2;
        let mut arg_start = i;
        let mut new_args: Vec<String> = Vec::new();
        let mut nesting = 0usize;
        loop {
            let b = s.as_bytes();
            let mut k = i;
            let mut found = None;
            while k < b.len() {
                match b[k] {
                    b'$' if b.get(k + 1) == Some(&b'(') => {
                        found = Some((k, b'$'));
                        break;
                    }
                    b'(' | b')' | b',' => {
                        found = Some((k, b[k]));
                        break;
                    }
                    _ => k += 1,
                }
            }
            let Some((k, c)) = found else {
                return Err(self.parse_error("missing end parenthesis in macro expansion"));
            };
            match c {
                b'(' => {
                    nesting += 1;
                    i = k + 1;
                }
                b')' => {
                    if nesting > 0 {
                        nesting -= 1;
                        i = k + 1;
                        continue;
                    }
                    new_args.push(s[arg_start..k].to_string());
                    let idx = py_int(&new_args[0], 10).and_then(|n| {
                        let n = if n < 0 { args.len() as i128 + n } else { n };
                        (n >= 0 && n < args.len() as i128).then_some(n as usize)
                    });
                    let val = match idx {
                        Some(idx) => args[idx].clone(),
                        None => self.fn_val(&new_args)?,
                    };
                    let mut res = prefix;
                    res.push_str(&val);
                    let ni = res.len();
                    res.push_str(&s[k + 1..]);
                    if res.len() > MAX_EXPANSION {
                        return Err(
                            self.err(ErrorKind::Preprocessor, "macro expansion is too large".to_string())
                        );
                    }
                    return Ok((res, ni));
                }
                b',' => {
                    i = k + 1;
                    if nesting > 0 {
                        continue;
                    }
                    new_args.push(s[arg_start..k].to_string());
                    arg_start = i;
                }
                _ => {
                    let (ns, ni) = self.expand_macro(s, k, args)?;
                    s = ns;
                    i = ni;
                }
            }
        }
    }

    /// The value of `$(args[0],args[1],...)`: a Kconfig variable or
    /// function, else a built-in function, else an environment variable,
    /// else empty (Linux's `preprocess.c`).
    fn fn_val(&mut self, args: &[String]) -> Result<String, KconfigError> {
        let f = args[0].clone();
        if let Some(var) = self.kc.variables.get_mut(&f) {
            if args.len() == 1 && var.n_expansions > 0 {
                return Err(
                    self.parse_error(&format!("Preprocessor variable {} recursively references itself", f))
                );
            }
            if var.n_expansions > MAX_FUNCTION_RECURSION {
                return Err(self
                    .parse_error(&format!("Preprocessor function {} seems stuck in infinite recursion", f)));
            }
            var.n_expansions += 1;
            let value = var.value.clone();
            let r = self.expand_whole(value, args);
            if let Some(var) = self.kc.variables.get_mut(&f) {
                var.n_expansions -= 1;
            }
            return r;
        }
        if let Some(&(_, min, max, run)) = BUILTIN_FUNCTIONS.iter().find(|b| b.0 == f) {
            let n = args.len() - 1;
            if n < min || n > max {
                let expected = if min == max { min.to_string() } else { format!("{}-{}", min, max) };
                return Err(self.err(
                    ErrorKind::Preprocessor,
                    format!("bad number of arguments in call to {}, expected {}, got {}", f, expected, n),
                ));
            }
            return run(self, &args[1..]);
        }
        if let Some(v) = self.kc.env.get(&f) {
            self.kc.env_vars.insert(f);
            return Ok(v);
        }
        Ok(String::new())
    }

    // ----- built-in functions (Linux 6.1's preprocess.c, plus `if`) -----

    fn fn_filename(&mut self, _: &[String]) -> Result<String, KconfigError> {
        Ok(self.filename.to_string())
    }

    fn fn_lineno(&mut self, _: &[String]) -> Result<String, KconfigError> {
        Ok(self.linenr.to_string())
    }

    /// `$(info,msg)` prints `msg` on stdout, as `conf` does.
    fn fn_info(&mut self, a: &[String]) -> Result<String, KconfigError> {
        println!("{}", a.first().map_or("", String::as_str));
        Ok(String::new())
    }

    fn fn_warning_if(&mut self, a: &[String]) -> Result<String, KconfigError> {
        if a[0] == "y" {
            self.warn_here(a[1].clone());
        }
        Ok(String::new())
    }

    fn fn_error_if(&mut self, a: &[String]) -> Result<String, KconfigError> {
        if a[0] == "y" {
            return Err(self.err(ErrorKind::Preprocessor, a[1].clone()));
        }
        Ok(String::new())
    }

    /// `$(if,cond,then[,else])`: `then` when `cond` is not empty (GNU make's
    /// `if`; Linux 6.1 itself writes it with `if-success`).
    fn fn_if(&mut self, a: &[String]) -> Result<String, KconfigError> {
        Ok(if !a[0].trim().is_empty() { a[1].clone() } else { a.get(2).cloned().unwrap_or_default() })
    }

    /// `$(shell,cmd)`: runs `/bin/sh -c cmd` when allowed; its stdout with
    /// trailing newlines removed and the others turned into spaces. stderr
    /// passes through, as with `conf`.
    fn fn_shell(&mut self, a: &[String]) -> Result<String, KconfigError> {
        if !self.kc.allow_shell {
            return Err(self.err(
                ErrorKind::Preprocessor,
                "$(shell,...) is not allowed: running commands needs --allow-shell (or KCONFIG_ALLOW_SHELL=1)"
                    .to_string(),
            ));
        }
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(&a[0]).stdin(std::process::Stdio::null());
        if let Some(vars) = self.kc.env.fixed_vars() {
            cmd.env_clear().envs(vars);
        }
        let out = cmd.output().map_err(|e| {
            self.err(ErrorKind::Preprocessor, format!("$(shell,...) could not start /bin/sh: {}", e))
        })?;
        std::io::Write::write_all(&mut std::io::stderr(), &out.stderr).ok();
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.trim_end_matches('\n').replace('\n', " "))
    }

    // ----- token helpers -----

    fn tok(&self, i: usize) -> Option<&Tok> {
        self.tokens.get(i)
    }

    fn cur_tok(&self) -> Option<&Tok> {
        self.tokens.get(self.tokens_i)
    }

    fn check_token(&mut self, t: &Tok) -> bool {
        if self.cur_tok() == Some(t) {
            self.tokens_i += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self) -> Result<SymId, KconfigError> {
        let t = self.cur_tok().cloned();
        self.tokens_i += 1;
        match t {
            Some(Tok::Sym(s)) => Ok(s),
            _ => Err(self.parse_error("expected symbol")),
        }
    }

    fn expect_nonconst_sym(&mut self) -> Result<SymId, KconfigError> {
        self.tokens_i = 2;
        match self.tok(1) {
            Some(Tok::Sym(s)) if !self.kc.syms[*s].is_constant => Ok(*s),
            _ => Err(self.parse_error("expected nonconstant symbol")),
        }
    }

    fn expect_str_and_eol(&mut self) -> Result<String, KconfigError> {
        let t = self.cur_tok().cloned();
        self.tokens_i += 1;
        let Some(Tok::Str(s)) = t else {
            return Err(self.parse_error("expected string"));
        };
        if self.cur_tok().is_some() {
            return Err(self.trailing_tokens_error());
        }
        Ok(s)
    }

    fn expect_expr_and_eol(&mut self) -> Result<Expr, KconfigError> {
        let e = self.parse_expr(true)?;
        if self.cur_tok().is_some() {
            return Err(self.trailing_tokens_error());
        }
        Ok(e)
    }

    fn parse_cond(&mut self) -> Result<Expr, KconfigError> {
        let e = if self.check_token(&Tok::Kw(Kw::If)) { self.parse_expr(true)? } else { Expr::y() };
        if self.cur_tok().is_some() {
            return Err(self.trailing_tokens_error());
        }
        Ok(e)
    }

    // ----- expressions -----

    fn parse_expr(&mut self, transform_m: bool) -> Result<Expr, KconfigError> {
        self.expr_depth += 1;
        let r = if self.expr_depth > MAX_EXPR_DEPTH {
            Err(self.parse_error("expression nested too deeply"))
        } else {
            self.parse_or(transform_m)
        };
        self.expr_depth -= 1;
        r
    }

    fn parse_or(&mut self, transform_m: bool) -> Result<Expr, KconfigError> {
        let and_expr = self.parse_and_expr(transform_m)?;
        if self.check_token(&Tok::Or) {
            let rhs = self.parse_expr(transform_m)?;
            Ok(Expr::Or(Box::new(and_expr), Box::new(rhs)))
        } else {
            Ok(and_expr)
        }
    }

    fn parse_and_expr(&mut self, transform_m: bool) -> Result<Expr, KconfigError> {
        let factor = self.parse_factor(transform_m)?;
        if self.check_token(&Tok::And) {
            self.expr_depth += 1;
            let r = if self.expr_depth > MAX_EXPR_DEPTH {
                Err(self.parse_error("expression nested too deeply"))
            } else {
                self.parse_and_expr(transform_m)
            };
            self.expr_depth -= 1;
            Ok(Expr::And(Box::new(factor), Box::new(r?)))
        } else {
            Ok(factor)
        }
    }

    fn parse_factor(&mut self, transform_m: bool) -> Result<Expr, KconfigError> {
        let t = self.cur_tok().cloned();
        self.tokens_i += 1;
        match t {
            Some(Tok::Sym(s)) => {
                if let Some(Tok::Rel(op)) = self.cur_tok().cloned() {
                    self.tokens_i += 1;
                    let rhs = self.expect_sym()?;
                    return Ok(Expr::Rel(op, s, rhs));
                }
                // In conditions, m means "m && MODULES".
                if transform_m && s == M {
                    return Ok(Expr::And(Box::new(Expr::Sym(M)), Box::new(Expr::Sym(self.kc.modules))));
                }
                Ok(Expr::Sym(s))
            }
            Some(Tok::Not) => {
                self.expr_depth += 1;
                let r = if self.expr_depth > MAX_EXPR_DEPTH {
                    Err(self.parse_error("expression nested too deeply"))
                } else {
                    self.parse_factor(transform_m)
                };
                self.expr_depth -= 1;
                Ok(Expr::Not(Box::new(r?)))
            }
            Some(Tok::LParen) => {
                let e = self.parse_expr(transform_m)?;
                if self.check_token(&Tok::RParen) {
                    return Ok(e);
                }
                Err(self.parse_error("malformed expression"))
            }
            _ => Err(self.parse_error("malformed expression")),
        }
    }

    // ----- blocks -----

    fn new_node(&mut self, item: Item, parent: NodeId) -> NodeId {
        let mut n = Node::new(item, self.filename.clone(), self.linenr, self.include_path.clone());
        n.parent = Some(parent);
        let id = self.kc.nodes.len();
        self.kc.nodes.push(n);
        id
    }

    fn link(&mut self, prev: NodeId, node: NodeId) -> NodeId {
        self.kc.nodes[prev].next = Some(node);
        node
    }

    /// Parses the contents of a file, `if`, menu or choice. Returns the last
    /// node of the block (or `prev` when it is empty).
    fn parse_block(&mut self, end: Option<Kw>, parent: NodeId, prev: NodeId) -> Result<NodeId, KconfigError> {
        self.depth += 1;
        let r = if self.depth > MAX_BLOCK_DEPTH {
            Err(self.parse_error("blocks nested too deeply"))
        } else {
            self.parse_block_inner(end, parent, prev)
        };
        self.depth -= 1;
        r
    }

    fn parse_block_inner(
        &mut self,
        end: Option<Kw>,
        parent: NodeId,
        mut prev: NodeId,
    ) -> Result<NodeId, KconfigError> {
        while self.next_line()? {
            let t0 = match self.tok(0) {
                None => continue,
                Some(Tok::Kw(k)) => *k,
                Some(_) => return Err(self.parse_error("unrecognized construct")),
            };
            match t0 {
                Kw::Config | Kw::Menuconfig => {
                    let sym = match self.tok(1) {
                        Some(Tok::Sym(s)) if !self.kc.syms[*s].is_constant => *s,
                        _ => return Err(self.parse_error("missing or bad symbol name")),
                    };
                    if self.tok(2).is_some() {
                        return Err(self.trailing_tokens_error());
                    }
                    self.kc.defined_syms.push(sym);
                    let node = self.new_node(Item::Sym(sym), parent);
                    self.kc.nodes[node].is_menuconfig = t0 == Kw::Menuconfig;
                    self.kc.syms[sym].nodes.push(node);
                    self.parse_props(node)?;
                    if self.kc.nodes[node].is_menuconfig && self.kc.nodes[node].prompt.is_none() {
                        self.kc.warn_msg(
                            format!("the menuconfig symbol {} has no prompt", self.kc.sym_name_and_loc(sym)),
                            None,
                        );
                    }
                    prev = self.link(prev, node);
                }
                Kw::Source | Kw::Rsource | Kw::Osource | Kw::Orsource => {
                    let mut pattern = self.expect_str_and_eol()?;
                    if matches!(t0, Kw::Rsource | Kw::Orsource) {
                        pattern = path_join(&dirname(&self.filename), &pattern);
                    }
                    let mut files = glob(&path_join(&self.kc.srctree_prefix, &pattern));
                    files.sort();
                    if files.is_empty() && matches!(t0, Kw::Source | Kw::Rsource) {
                        let st = if self.kc.srctree.is_empty() {
                            "unset or blank".to_string()
                        } else {
                            format!("set to '{}'", self.kc.srctree)
                        };
                        return Err(self.err(
                            ErrorKind::Io,
                            format!(
                                "'{}' not found (in '{}'). Check that environment variables are set \
                                 correctly (e.g. $srctree, which is {}). Also note that unset environment \
                                 variables expand to the empty string.",
                                pattern,
                                py_strip(&self.line),
                                st
                            ),
                        ));
                    }
                    for f in files {
                        self.enter_file(&f)?;
                        let r = self.parse_block(None, parent, prev);
                        prev = r?;
                        self.leave_file();
                    }
                }
                k if Some(k) == end => {
                    if self.tok(1).is_some() {
                        return Err(self.trailing_tokens_error());
                    }
                    self.kc.nodes[prev].next = None;
                    return Ok(prev);
                }
                Kw::If => {
                    let node = self.new_node(Item::If, parent);
                    let dep = self.expect_expr_and_eol()?;
                    self.kc.nodes[node].dep = dep;
                    self.parse_block(Some(Kw::Endif), node, node)?;
                    self.kc.nodes[node].list = self.kc.nodes[node].next;
                    prev = self.link(prev, node);
                }
                Kw::Menu => {
                    let node = self.new_node(Item::Menu, parent);
                    self.kc.nodes[node].is_menuconfig = true;
                    let title = self.expect_str_and_eol()?;
                    self.kc.nodes[node].prompt = Some((title, Expr::y()));
                    self.kc.nodes[node].orig_prompt_cond = Some(Expr::y());
                    self.kc.menus.push(node);
                    self.parse_props(node)?;
                    self.parse_block(Some(Kw::Endmenu), node, node)?;
                    self.kc.nodes[node].list = self.kc.nodes[node].next;
                    prev = self.link(prev, node);
                }
                Kw::Comment => {
                    let node = self.new_node(Item::Comment, parent);
                    let text = self.expect_str_and_eol()?;
                    self.kc.nodes[node].prompt = Some((text, Expr::y()));
                    self.kc.nodes[node].orig_prompt_cond = Some(Expr::y());
                    self.kc.comments.push(node);
                    self.parse_props(node)?;
                    prev = self.link(prev, node);
                }
                Kw::Choice => {
                    let choice = if self.tok(1).is_none() {
                        let c = self.kc.choices.len();
                        self.kc.choices.push(ChoiceData::new(None));
                        c
                    } else {
                        let name = self.expect_str_and_eol()?;
                        match self.kc.named_choices.get(&name) {
                            Some(&c) => c,
                            None => {
                                let c = self.kc.choices.len();
                                self.kc.choices.push(ChoiceData::new(Some(name.clone())));
                                self.kc.named_choices.insert(name, c);
                                c
                            }
                        }
                    };
                    self.kc.choice_order.push(choice);
                    let node = self.new_node(Item::Choice(choice), parent);
                    self.kc.nodes[node].is_menuconfig = true;
                    self.kc.choices[choice].nodes.push(node);
                    self.parse_props(node)?;
                    self.parse_block(Some(Kw::Endchoice), node, node)?;
                    self.kc.nodes[node].list = self.kc.nodes[node].next;
                    prev = self.link(prev, node);
                }
                Kw::Mainmenu => {
                    let title = self.expect_str_and_eol()?;
                    let top = self.kc.top;
                    self.kc.nodes[top].prompt = Some((title, Expr::y()));
                }
                Kw::Endchoice => return Err(self.parse_error("no corresponding 'choice'")),
                Kw::Endif => return Err(self.parse_error("no corresponding 'if'")),
                Kw::Endmenu => return Err(self.parse_error("no corresponding 'menu'")),
                _ => return Err(self.parse_error("unrecognized construct")),
            }
        }
        if let Some(end) = end {
            let what = match end {
                Kw::Endchoice => "endchoice",
                Kw::Endif => "endif",
                _ => "endmenu",
            };
            return Err(self
                .err(ErrorKind::Parse, format!("error: expected '{}' at end of '{}'", what, self.filename)));
        }
        Ok(prev)
    }

    fn set_type(&mut self, node: NodeId, t: SymbolType) -> Result<(), KconfigError> {
        let old = match self.kc.nodes[node].item {
            Item::Sym(s) => self.kc.syms[s].orig_type,
            Item::Choice(c) => self.kc.choices[c].orig_type,
            _ => return Err(self.parse_error("only symbols and choices can have a type")),
        };
        if old != SymbolType::Unknown && old != t {
            self.kc.warn_msg(
                format!(
                    "{} defined with multiple types, {} will be used",
                    self.kc.node_item_name_and_loc(node),
                    t.as_str()
                ),
                None,
            );
        }
        match self.kc.nodes[node].item {
            Item::Sym(s) => self.kc.syms[s].orig_type = t,
            Item::Choice(c) => self.kc.choices[c].orig_type = t,
            _ => {}
        }
        Ok(())
    }

    fn parse_prompt(&mut self, node: NodeId) -> Result<(), KconfigError> {
        if !matches!(self.kc.nodes[node].item, Item::Sym(_) | Item::Choice(_)) {
            return Err(self.parse_error("only symbols and choices can have a 'prompt'"));
        }
        if self.kc.nodes[node].prompt.is_some() {
            self.kc.warn_msg(
                format!(
                    "{} defined with multiple prompts in single location",
                    self.kc.node_item_name_and_loc(node)
                ),
                None,
            );
        }
        self.tokens_i = 2;
        let Some(Tok::Str(prompt)) = self.tok(1).cloned() else {
            return Err(self.parse_error("expected prompt string"));
        };
        let stripped = py_strip(&prompt);
        let prompt = if stripped != prompt {
            self.kc.warn_msg(
                format!(
                    "{} has leading or trailing whitespace in its prompt",
                    self.kc.node_item_name_and_loc(node)
                ),
                None,
            );
            stripped.to_string()
        } else {
            prompt
        };
        let cond = self.parse_cond()?;
        self.kc.nodes[node].orig_prompt_cond = Some(cond.clone());
        self.kc.nodes[node].prompt = Some((prompt, cond));
        Ok(())
    }

    fn is_sym_node(&self, node: NodeId) -> Option<SymId> {
        match self.kc.nodes[node].item {
            Item::Sym(s) => Some(s),
            _ => None,
        }
    }

    /// Parses the property lines after `config`, `choice`, `menu` or
    /// `comment`, stopping at the first line that is not a property.
    fn parse_props(&mut self, node: NodeId) -> Result<(), KconfigError> {
        self.kc.nodes[node].dep = Expr::y();
        while self.next_line()? {
            let t0 = match self.tok(0) {
                None => continue,
                Some(Tok::Kw(k)) => *k,
                Some(_) => {
                    self.reuse_tokens = true;
                    return Ok(());
                }
            };
            if let Some(t) = type_of_kw(t0) {
                self.set_type(node, t)?;
                if self.tok(1).is_some() {
                    self.parse_prompt(node)?;
                }
                continue;
            }
            if let Some(t) = def_type_of_kw(t0) {
                self.set_type(node, t)?;
                let d = self.parse_expr(false)?;
                let c = self.parse_cond()?;
                self.kc.nodes[node].orig_defaults.push((d.clone(), c.clone()));
                self.kc.nodes[node].defaults.push((d, c));
                continue;
            }
            match t0 {
                Kw::Depends => {
                    if !self.check_token(&Tok::Kw(Kw::On)) {
                        return Err(self.parse_error("expected 'on' after 'depends'"));
                    }
                    let e = self.expect_expr_and_eol()?;
                    let dep = std::mem::replace(&mut self.kc.nodes[node].dep, Expr::y());
                    self.kc.nodes[node].dep = make_and(dep, e);
                }
                Kw::Help => self.parse_help(node)?,
                Kw::Select | Kw::Imply => {
                    if self.is_sym_node(node).is_none() {
                        return Err(self.parse_error(if t0 == Kw::Select {
                            "only symbols can select"
                        } else {
                            "only symbols can imply"
                        }));
                    }
                    let target = self.expect_nonconst_sym()?;
                    let cond = self.parse_cond()?;
                    let n = &mut self.kc.nodes[node];
                    if t0 == Kw::Select {
                        n.orig_selects.push((target, cond.clone()));
                        n.selects.push((target, cond));
                    } else {
                        n.orig_implies.push((target, cond.clone()));
                        n.implies.push((target, cond));
                    }
                }
                Kw::Default => {
                    let d = self.parse_expr(false)?;
                    let c = self.parse_cond()?;
                    self.kc.nodes[node].orig_defaults.push((d.clone(), c.clone()));
                    self.kc.nodes[node].defaults.push((d, c));
                }
                Kw::Prompt => self.parse_prompt(node)?,
                Kw::Range => {
                    let lo = self.expect_sym()?;
                    let hi = self.expect_sym()?;
                    let c = self.parse_cond()?;
                    self.kc.nodes[node].orig_ranges.push((lo, hi, c.clone()));
                    self.kc.nodes[node].ranges.push((lo, hi, c));
                }
                Kw::Visible => {
                    if !self.check_token(&Tok::Kw(Kw::If)) {
                        return Err(self.parse_error("expected 'if' after 'visible'"));
                    }
                    if self.kc.nodes[node].item != Item::Menu {
                        return Err(self.parse_error("'visible if' is only valid for menus"));
                    }
                    let e = self.expect_expr_and_eol()?;
                    let v = std::mem::replace(&mut self.kc.nodes[node].visibility, Expr::y());
                    self.kc.nodes[node].visibility = make_and(v, e);
                }
                Kw::Option => self.parse_option(node)?,
                // Newer kernels spell `option modules` as a bare `modules`
                // (kconfiglib rejects the line; anything else on it still is).
                Kw::Modules if self.tok(1).is_none() => self.option_modules(node)?,
                Kw::Optional => {
                    let Item::Choice(c) = self.kc.nodes[node].item else {
                        return Err(self.parse_error("\"optional\" is only valid for choices"));
                    };
                    self.kc.choices[c].is_optional = true;
                }
                _ => {
                    self.reuse_tokens = true;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn option_modules(&mut self, node: NodeId) -> Result<(), KconfigError> {
        if self.is_sym_node(node) != Some(self.kc.modules) {
            self.warn_here(
                "the 'modules' option is not supported. Let me know if this is a problem for you, as it \
                 wouldn't be that hard to implement. Note that modules are supported -- Kconfiglib just \
                 assumes the symbol name MODULES, like older versions of the C implementation did when \
                 'option modules' wasn't used."
                    .to_string(),
            );
        }
        Ok(())
    }

    fn parse_option(&mut self, node: NodeId) -> Result<(), KconfigError> {
        if self.check_token(&Tok::Kw(Kw::Env)) {
            if !self.check_token(&Tok::Rel(RelOp::Eq)) {
                return Err(self.parse_error("expected '=' after 'env'"));
            }
            let env_var = self.expect_str_and_eol()?;
            let Some(sym) = self.is_sym_node(node) else {
                return Err(self.parse_error("'option env' is only valid for symbols"));
            };
            self.kc.syms[sym].env_var = Some(env_var.clone());
            match self.kc.env.get(&env_var) {
                Some(v) => {
                    let c = self.kc.lookup_const_sym(&v);
                    self.kc.nodes[node].orig_defaults.push((Expr::Sym(c), Expr::y()));
                    self.kc.nodes[node].defaults.push((Expr::Sym(c), Expr::y()));
                }
                None => self.warn_here(format!(
                    "{1} has 'option env=\"{0}\"', but the environment variable {0} is not set",
                    self.kc.syms[sym].name, env_var
                )),
            }
            if env_var != self.kc.syms[sym].name {
                self.warn_here(format!(
                    "Kconfiglib expands environment variables in strings directly, meaning you do not need \
                     'option env=...' \"bounce\" symbols. For compatibility with the C tools, rename {} to {} \
                     (so that the symbol name matches the environment variable name).",
                    self.kc.syms[sym].name, env_var
                ));
            }
        } else if self.check_token(&Tok::Kw(Kw::DefconfigList)) {
            let Some(sym) = self.is_sym_node(node) else {
                return Err(self.parse_error("'option defconfig_list' is only valid for symbols"));
            };
            match self.kc.defconfig_list {
                None => self.kc.defconfig_list = Some(sym),
                Some(d) => self.warn_here(format!(
                    "'option defconfig_list' set on multiple symbols ({0} and {1}). Only {0} will be used.",
                    self.kc.syms[d].name, self.kc.syms[sym].name
                )),
            }
        } else if self.check_token(&Tok::Kw(Kw::Modules)) {
            self.option_modules(node)?;
        } else if self.check_token(&Tok::Kw(Kw::AllnoconfigY)) {
            let Some(sym) = self.is_sym_node(node) else {
                return Err(self.parse_error("the 'allnoconfig_y' option is only valid for symbols"));
            };
            self.kc.syms[sym].is_allnoconfig_y = true;
        } else {
            return Err(self.parse_error("unrecognized option"));
        }
        Ok(())
    }

    /// Help text: everything indented at least as deeply as its first
    /// non-blank line.
    fn parse_help(&mut self, node: NodeId) -> Result<(), KconfigError> {
        if self.kc.nodes[node].help.is_some() {
            self.kc.warn_msg(
                format!(
                    "{} defined with more than one help text -- only the last one will be used",
                    self.kc.node_item_name_and_loc(node)
                ),
                None,
            );
        }
        let mut line;
        loop {
            line = self.readline();
            self.linenr += 1;
            if line.is_empty() {
                return self.empty_help(node, line);
            }
            if !str_isspace(&line) {
                break;
            }
        }
        let expline = expand_tabs(&line);
        let indent = indent_chars(&expline);
        if indent == 0 {
            return self.empty_help(node, line);
        }
        let mut lines: Vec<String> = vec![skip_chars(&expline, indent).to_string()];
        loop {
            line = self.readline();
            if str_isspace(&line) {
                lines.push("\n".to_string());
            } else if line.is_empty() {
                break;
            } else {
                let exp = expand_tabs(&line);
                if indent_chars(&exp) < indent {
                    break;
                }
                lines.push(skip_chars(&exp, indent).to_string());
            }
        }
        self.linenr += lines.len();
        self.kc.nodes[node].help = Some(py_rstrip(&lines.concat()).to_string());
        if !line.is_empty() {
            self.line_after_help(line)?;
        }
        Ok(())
    }

    fn empty_help(&mut self, node: NodeId, line: String) -> Result<(), KconfigError> {
        self.kc.warn_msg(
            format!("{} has 'help' but empty help text", self.kc.node_item_name_and_loc(node)),
            None,
        );
        self.kc.nodes[node].help = Some(String::new());
        if !line.is_empty() {
            self.line_after_help(line)?;
        }
        Ok(())
    }
}
