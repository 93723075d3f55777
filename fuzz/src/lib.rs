//! What the fuzz targets share.

/// A target's input: the bytes after the mode byte as they are (bit 0 of
/// `mode` clear), or (set) each byte naming a word of `tokens`. libFuzzer
/// does not guess a format's words from byte comparisons in a short run;
/// tokens reach well-formed inputs, and their near misses, at once.
pub fn expand(mode: u8, rest: &[u8], tokens: &[&[u8]]) -> Vec<u8> {
    if mode & 1 == 0 {
        rest.to_vec()
    } else {
        rest.iter()
            .flat_map(|&b| tokens[usize::from(b) % tokens.len()].iter().copied())
            .collect()
    }
}
