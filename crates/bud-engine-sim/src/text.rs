//! Deterministic content: prompt fingerprints, token counts, generated words and embedding
//! vectors. Pure functions; the same input and seed give the same output on every run and
//! every machine (no `RandomState`, no clock).
//!
//! Token counts are estimates, not a tokenizer: one token per whitespace-separated word, plus
//! one per chat message for its role framing; a completion prompt counts at least one token
//! (the BOS token a real tokenizer adds); a prompt given as token ids counts its ids.

use base64::Engine as _;

macro_rules! vocabulary {
    ($($word:literal),* $(,)?) => {
        /// The words generated text is made of, in the form of a first token.
        const WORDS: &[&str] = &[$($word),*];
        /// The same words with the leading space every later token carries.
        const SPACED_WORDS: &[&str] = &[$(concat!(" ", $word)),*];
    };
}

vocabulary!(
    "the",
    "model",
    "serves",
    "tokens",
    "quickly",
    "and",
    "a",
    "cluster",
    "of",
    "engines",
    "answers",
    "every",
    "request",
    "with",
    "care",
    "while",
    "the",
    "gateway",
    "routes",
    "traffic",
    "to",
    "healthy",
    "replicas",
    "so",
    "latency",
    "stays",
    "low",
    "under",
    "load",
    "when",
    "batches",
    "grow",
    "large",
    "memory",
    "is",
    "shared",
    "across",
    "sequences",
    "that",
    "wait",
    "their",
    "turn",
    "in",
    "order",
    "until",
    "a",
    "slot",
    "opens",
    "then",
    "prefill",
    "runs",
    "once",
    "decode",
    "follows",
    "step",
    "by",
    "step",
    "through",
    "the",
    "night",
    "bud",
    "keeps",
    "watch",
    "everywhere",
);

/// A running fingerprint of request content (64-bit FNV-1a), finished with the engine's seed.
#[derive(Debug, Clone, Copy)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprint {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// An empty fingerprint.
    pub const fn new() -> Self {
        Self(Self::OFFSET)
    }

    /// Adds bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
    }

    /// Adds a separator no text contains, so `["ab", "c"]` and `["a", "bc"]` differ.
    pub fn separate(&mut self) {
        self.write(&[0xff]);
    }

    /// Adds a token id.
    pub fn write_token(&mut self, id: u32) {
        self.write(&id.to_le_bytes());
    }

    /// The fingerprint under `seed`.
    pub fn finish(self, seed: u64) -> u64 {
        mix(self.0 ^ mix(seed))
    }
}

/// Estimated tokens in `text`: its whitespace-separated words.
pub fn word_count(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

/// The text of token `index` of the answer to a prompt with fingerprint `fingerprint`.
pub fn token(fingerprint: u64, index: u32) -> &'static str {
    let pick = mix(fingerprint.wrapping_add(u64::from(index).wrapping_mul(GOLDEN)));
    // The modulo of a 64-bit mix by a small constant: the bias is far below notice.
    let at = usize::try_from(pick % WORDS.len() as u64).unwrap_or(0);
    if index == 0 { WORDS[at] } else { SPACED_WORDS[at] }
}

/// The whole answer of `tokens` tokens, as non-streaming responses send it.
pub fn answer(fingerprint: u64, tokens: u32) -> String {
    let mut text = String::with_capacity(tokens as usize * 9);
    for i in 0..tokens {
        text.push_str(token(fingerprint, i));
    }
    text
}

/// A unit vector of `dim` components derived from a fingerprint.
pub fn embedding(fingerprint: u64, dim: usize) -> Vec<f32> {
    let mut vector: Vec<f32> = (0..dim as u64)
        .map(|i| {
            let bits = mix(fingerprint.wrapping_add(i.wrapping_mul(GOLDEN)));
            // The top 24 bits fit an f32 mantissa exactly; map them onto [-1, 1).
            (bits >> 40) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect();
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    } else if let Some(first) = vector.first_mut() {
        *first = 1.0;
    }
    vector
}

/// A vector as OpenAI's `encoding_format: "base64"` sends it: little-endian f32s, base64.
pub fn embedding_base64(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A number from 0.0 (inclusive) to 1.0 (exclusive) picked by `state`, for fault sampling.
pub fn unit_interval(state: u64) -> f64 {
    (mix(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// 2^64 / φ: consecutive multiples land far apart.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's finaliser: a bijection that spreads every input bit over the output.
const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(text: &str, seed: u64) -> u64 {
        let mut f = Fingerprint::new();
        f.write(text.as_bytes());
        f.finish(seed)
    }

    #[test]
    fn same_prompt_same_answer_and_seed_changes_it() {
        let a = answer(fingerprint("hello there", 0), 32);
        assert_eq!(a, answer(fingerprint("hello there", 0), 32));
        assert_ne!(a, answer(fingerprint("hello there", 1), 32));
        assert_ne!(a, answer(fingerprint("hello where", 0), 32));
    }

    #[test]
    fn answer_is_its_tokens_joined_by_spaces() {
        let f = fingerprint("x", 7);
        let joined: String = (0..5).map(|i| token(f, i)).collect();
        assert_eq!(joined, answer(f, 5));
        assert_eq!(answer(f, 5).split(' ').count(), 5);
        assert!(!answer(f, 5).starts_with(' '));
    }

    #[test]
    fn separators_tell_splits_apart() {
        let mut a = Fingerprint::new();
        a.write(b"ab");
        a.separate();
        a.write(b"c");
        let mut b = Fingerprint::new();
        b.write(b"a");
        b.separate();
        b.write(b"bc");
        assert_ne!(a.finish(0), b.finish(0));
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let v = embedding(fingerprint("text", 0), 384);
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        assert_eq!(v, embedding(fingerprint("text", 0), 384));
        assert_ne!(v, embedding(fingerprint("other", 0), 384));
    }

    #[test]
    fn base64_round_trips_little_endian_floats() {
        let v = [1.0f32, -0.5];
        let bytes = base64::engine::general_purpose::STANDARD.decode(embedding_base64(&v)).unwrap();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), (-0.5f32).to_le_bytes()].concat());
    }

    #[test]
    fn word_counts() {
        assert_eq!(word_count(""), 0);
        assert_eq!(word_count("  one two\tthree\n"), 3);
    }

    #[test]
    fn unit_interval_stays_in_range_and_spreads() {
        let below_half = (0..10_000).filter(|&i| unit_interval(i) < 0.5).count();
        assert!((4_500..5_500).contains(&below_half), "{below_half}");
        assert!((0..10_000).all(|i| (0.0..1.0).contains(&unit_interval(i))));
    }
}
