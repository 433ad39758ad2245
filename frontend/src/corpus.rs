//! Text corpora for training: files (plain text or JSON lines), pre-tokenized shards, and a
//! synthetic corpus generated from a seeded grammar, so the embedded default needs no
//! third-party text.

use sparkc_ir::rng::Rng;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} line {line}: {msg}")]
    Jsonl { path: String, line: usize, msg: String },
    #[error("{path}: {msg}")]
    Shard { path: String, msg: String },
}

/// One document per file.
pub fn read_text(path: &Path) -> Result<String, CorpusError> {
    std::fs::read_to_string(path).map_err(|source| CorpusError::Io { path: path.display().to_string(), source })
}

/// One document per line: the string under `field` of each JSON object (blank lines skipped).
pub fn read_jsonl(path: &Path, field: &str) -> Result<Vec<String>, CorpusError> {
    let text = read_text(path)?;
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| CorpusError::Jsonl { path: path.display().to_string(), line: i + 1, msg };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        let s = v.get(field).and_then(|s| s.as_str()).ok_or_else(|| err(format!("no string field `{field}`")))?;
        docs.push(s.to_string());
    }
    Ok(docs)
}

/// Element width of a pre-tokenized shard: raw little-endian token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardDtype {
    U16,
    U32,
}

pub fn read_shard(path: &Path, dtype: ShardDtype) -> Result<Vec<u32>, CorpusError> {
    let bytes = std::fs::read(path).map_err(|source| CorpusError::Io { path: path.display().to_string(), source })?;
    let width = match dtype {
        ShardDtype::U16 => 2,
        ShardDtype::U32 => 4,
    };
    if bytes.len() % width != 0 {
        return Err(CorpusError::Shard {
            path: path.display().to_string(),
            msg: format!("{} bytes is not a whole number of {width}-byte token ids", bytes.len()),
        });
    }
    Ok(match dtype {
        ShardDtype::U16 => bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
        ShardDtype::U32 => bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    })
}

const ADJECTIVES: &[&str] = &["quiet", "bright", "small", "eager", "old", "swift", "calm", "silver", "hidden", "patient"];
const NOUNS: &[&str] = &["neuron", "spike", "signal", "river", "garden", "engine", "lantern", "forest", "circuit", "sparrow", "pattern", "window"];
const VERBS: &[&str] = &["fires", "waits", "listens", "glows", "travels", "rests", "hums", "wanders", "returns", "counts"];
const PLACES: &[&str] = &["at dawn", "in the dark", "near the river", "after the rain", "before the storm", "under the bridge", "all night", "in silence"];
const NUMBERS: &[&str] = &["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"];

fn pick<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.below(xs.len() as u64) as usize]
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
}

/// About `chars` characters of English-like text from a small seeded grammar: sentences of a
/// few templates, counting runs and simple sums, in paragraphs. Learnable structure (spelling,
/// spacing, punctuation, agreement, counting) that a tiny model picks up in minutes.
pub fn synthetic(seed: u64, chars: usize) -> String {
    let mut rng = Rng::new(seed);
    let mut out = String::with_capacity(chars + 256);
    while out.len() < chars {
        let sentences = 2 + rng.below(4);
        for _ in 0..sentences {
            let s = match rng.below(6) {
                0 => format!("the {} {} {} {}.", pick(&mut rng, ADJECTIVES), pick(&mut rng, NOUNS), pick(&mut rng, VERBS), pick(&mut rng, PLACES)),
                1 => format!("a {} {} when the {} {}.", pick(&mut rng, NOUNS), pick(&mut rng, VERBS), pick(&mut rng, NOUNS), pick(&mut rng, VERBS)),
                2 => {
                    let start = rng.below(5) as usize;
                    let len = 3 + rng.below(4) as usize;
                    format!("count {}.", NUMBERS[start..(start + len).min(NUMBERS.len())].join(" "))
                }
                3 => {
                    let (a, b) = (rng.below(5) as usize, rng.below(5) as usize);
                    format!("{} plus {} is {}.", NUMBERS[a], NUMBERS[b], NUMBERS[a + b + 1])
                }
                4 => format!("every {} {} like a {} {}.", pick(&mut rng, NOUNS), pick(&mut rng, VERBS), pick(&mut rng, ADJECTIVES), pick(&mut rng, NOUNS)),
                _ => format!("the {} and the {} {} together.", pick(&mut rng, NOUNS), pick(&mut rng, NOUNS), pick(&mut rng, &["rest", "wait", "listen", "glow", "travel"])),
            };
            out.push_str(&capitalize(&s));
            out.push(' ');
        }
        out.pop();
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_seeded_and_sized() {
        let a = synthetic(1, 5000);
        assert_eq!(a, synthetic(1, 5000));
        assert_ne!(a, synthetic(2, 5000));
        assert!(a.len() >= 5000 && a.is_ascii());
        assert!(a.contains(" plus ") && a.contains("Count "));
    }

    #[test]
    fn shards() {
        let dir = std::env::temp_dir().join(format!("sparkc-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.bin");
        std::fs::write(&p, [1u8, 0, 2, 0, 255, 255]).unwrap();
        assert_eq!(read_shard(&p, ShardDtype::U16).unwrap(), vec![1, 2, 65535]);
        assert!(read_shard(&p, ShardDtype::U32).is_err());
    }
}
