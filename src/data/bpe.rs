//! GPT-2's byte-pair encoding, through `tiktoken-rs`'s `r50k_base`, whose
//! merge table is compiled into the binary (no download).
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use tiktoken_rs::CoreBPE;

/// GPT-2's vocabulary: 50000 merges, 256 bytes and `<|endoftext|>`.
pub const GPT2_VOCAB_SIZE: u32 = 50257;
/// `<|endoftext|>`, which separates documents.
pub const GPT2_EOT: u32 = 50256;
/// How meta.json names the tokenizer.
pub const TOKENIZER_NAME: &str = "gpt2";
pub const ENCODING_NAME: &str = "r50k_base";

static BPE: OnceLock<Result<CoreBPE, String>> = OnceLock::new();

/// The tokenizer, built once per process.
pub fn gpt2() -> Result<&'static CoreBPE> {
    BPE.get_or_init(|| tiktoken_rs::r50k_base().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("cannot build the GPT-2 tokenizer: {e}"))
}

/// Token ids of `text`; special tokens such as `<|endoftext|>` in the text
/// are encoded as ordinary text.
pub fn encode(text: &str) -> Result<Vec<u32>> {
    Ok(gpt2()?.encode_ordinary(text))
}

/// Text of token ids (bytes that are not valid UTF-8, as at a cut through
/// a multi-byte character, become U+FFFD).
pub fn decode(ids: &[u32]) -> Result<String> {
    if let Some(bad) = ids.iter().find(|&&t| t >= GPT2_VOCAB_SIZE) {
        bail!("token id {bad} is outside GPT-2's vocabulary of {GPT2_VOCAB_SIZE}");
    }
    let bytes = gpt2()?.decode_bytes(ids).map_err(|e| anyhow!("cannot decode token {}", e.token))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_round_trip() {
        // "Hello world" is [15496, 995] in GPT-2.
        assert_eq!(encode("Hello world").unwrap(), vec![15496, 995]);
        let text = "The Fulton County Grand Jury said Friday.\n";
        assert_eq!(decode(&encode(text).unwrap()).unwrap(), text);
        assert_eq!(decode(&[GPT2_EOT]).unwrap(), "<|endoftext|>");
        assert!(decode(&[50257]).unwrap_err().to_string().contains("outside"));
    }
}
