//! Seeded workloads shared by the criterion benchmarks in `benches/`, so
//! that every run measures the same requests.

/// `n` random block numbers below `blocks`, from a fixed `seed`
/// (xorshift64*: fast, reproducible, good enough to defeat caches).
pub fn random_blocks(seed: u64, n: usize, blocks: u64) -> Vec<u64> {
    let mut x = seed.max(1);
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D) % blocks.max(1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_seed_same_stream_and_in_range() {
        let a = super::random_blocks(7, 1000, 333);
        assert_eq!(a, super::random_blocks(7, 1000, 333));
        assert_ne!(a, super::random_blocks(8, 1000, 333));
        assert!(a.iter().all(|&b| b < 333));
    }
}
