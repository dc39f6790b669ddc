//! Replays the fuzz entry points over a deterministic corpus, so the fuzz targets' code runs
//! in every `cargo test` even where cargo-fuzz is unavailable.

use std::path::PathBuf;

use crate::virtio::fuzzing::{fuzz_block, fuzz_net, fuzz_rng};

/// xorshift64*: a small deterministic generator for the synthetic corpus.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A plausible input: a descriptor table with small addresses and lengths, mostly valid next
/// links, an avail ring with a few entries, and random data.
fn structured(r: &mut Rand) -> Vec<u8> {
    let mut v = vec![0u8; 0x1000];
    for i in 0..16usize {
        let d = &mut v[i * 16..i * 16 + 16];
        let addr = 0x800 + (r.next() % 0x3_f000);
        let len = (r.next() % 0x1200) as u32;
        let flags = (r.next() % 8) as u16;
        let next = (r.next() % 18) as u16;
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
    }
    // avail ring: flags, idx, ring[16]
    v[0x102..0x104].copy_from_slice(&((r.next() % 20) as u16).to_le_bytes());
    for i in 0..16 {
        let head = (r.next() % 17) as u16;
        v[0x104 + 2 * i..0x106 + 2 * i].copy_from_slice(&head.to_le_bytes());
    }
    // The second queue (net TX) mirrors the first.
    let (a, b) = v.split_at_mut(0x400);
    b[..0x200].copy_from_slice(&a[..0x200]);
    // Request headers / data.
    for x in v[0x800..].iter_mut() {
        *x = r.next() as u8;
    }
    v[0x800] = (r.next() % 16) as u8;
    v
}

fn corpus() -> Vec<Vec<u8>> {
    let mut r = Rand(0x5eed_cafe_f00d_0001);
    let mut c: Vec<Vec<u8>> = vec![vec![], vec![0; 1], vec![0xff; 0x800]];
    for _ in 0..200 {
        c.push(structured(&mut r));
    }
    for len in [16usize, 300, 0x500, 0x2000] {
        c.push((0..len).map(|_| r.next() as u8).collect());
    }
    // Checked-in seeds (crashes found by cargo fuzz go here too).
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for target in ["virtio_blk", "virtio_net", "virtio_rng"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(target)) {
            for e in entries.flatten() {
                if let Ok(data) = std::fs::read(e.path()) {
                    c.push(data);
                }
            }
        }
    }
    c
}

#[test]
fn fuzz_corpus_block() {
    for input in corpus() {
        fuzz_block(&input);
    }
}

#[test]
fn fuzz_corpus_net() {
    for input in corpus() {
        fuzz_net(&input);
    }
}

#[test]
fn fuzz_corpus_rng() {
    for input in corpus() {
        fuzz_rng(&input);
    }
}
