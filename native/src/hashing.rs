//! The two hashes ingest has always used, bit for bit with their Python versions.

/// Kafka's default partitioner hash (`org.apache.kafka.common.utils.Utils.murmur2`, as
/// `aiokafka.partitioner.murmur2` computes it): a producer keying by account and ingest's routing
/// agree on every account's partition.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_B28C;
    const M: u32 = 0x5BD1_E995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of an account: `(murmur2(key) & 0x7fffffff) % partitions`, as Kafka's.
pub fn partition_of(account: &[u8], partitions: u32) -> u32 {
    (murmur2(account) & 0x7FFF_FFFF) % partitions
}

/// `xxhash.xxh3_128_digest`: the 128-bit xxh3 hash, big-endian.
pub fn fingerprint(normalized_event: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(normalized_event).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Values from aiokafka.partitioner.murmur2 and xxhash.xxh3_128_digest.
        assert_eq!(fingerprint(b"abc")[..4], [0x06, 0xb0, 0x5a, 0xb6]);
        assert_eq!(murmur2(b""), 275646681);
        assert_eq!(murmur2(b"a"), 2731586172);
        assert_eq!(murmur2(b"acct-00042"), 2106729929);
    }
}
