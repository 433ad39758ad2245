//! Tokenizer glue: HF tokenizer.json files through the `tokenizers` crate, and a built-in
//! byte-level tokenizer (id = byte value) for models with a 256-token vocabulary.

use std::path::Path;
use tokenizers::Tokenizer;

/// GPT-2's byte → printable-char table, which the ByteLevel pre-tokenizer and decoder use.
fn byte_to_char(b: u8) -> char {
    let printable = |c: u8| (b'!'..=b'~').contains(&c) || (0xA1..=0xAC).contains(&c) || (0xAE..=0xFF).contains(&c);
    if printable(b) {
        return b as char;
    }
    let offset = (0..b).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + offset).expect("valid code point")
}

/// The JSON of a byte-level BPE tokenizer with no merges: every byte is its own token.
pub fn byte_level_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..=255u8).map(|b| (byte_to_char(b).to_string(), serde_json::Value::from(b as u64))).collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
    .to_string()
}

pub fn byte_level() -> Tokenizer {
    byte_level_json().parse().expect("the built-in byte-level tokenizer parses")
}

/// `--tokenizer` takes a tokenizer.json path or `bytes` for the built-in byte-level tokenizer.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer: {0}")]
pub struct TokenizerError(pub String);

pub fn load(spec: &str) -> Result<Tokenizer, TokenizerError> {
    if spec == "bytes" {
        return Ok(byte_level());
    }
    let p = Path::new(spec);
    if !p.exists() {
        return Err(TokenizerError(format!("`{spec}` does not exist (give a tokenizer.json or `bytes`)")));
    }
    Tokenizer::from_file(p).map_err(|e| TokenizerError(format!("cannot load {spec}: {e}")))
}

pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<i64>, TokenizerError> {
    let enc = tok.encode(text, false).map_err(|e| TokenizerError(format!("cannot tokenize: {e}")))?;
    Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
}

pub fn decode(tok: &Tokenizer, ids: &[i64]) -> Result<String, TokenizerError> {
    let ids: Vec<u32> = ids
        .iter()
        .map(|&i| u32::try_from(i).map_err(|_| TokenizerError(format!("token id {i} is negative"))))
        .collect::<Result<_, _>>()?;
    tok.decode(&ids, false).map_err(|e| TokenizerError(format!("cannot decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips() {
        let tok = byte_level();
        let text = "Spikes: ∑ β·v ≥ θ\n";
        let ids = encode(&tok, text).unwrap();
        assert_eq!(ids, text.bytes().map(|b| b as i64).collect::<Vec<_>>());
        assert_eq!(decode(&tok, &ids).unwrap(), text);
    }
}
