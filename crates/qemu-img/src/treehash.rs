//! The BLAKE3 of bytes that arrive in order except their first block, which comes last: a
//! backup file whose header is written after its data (as the `encode` module writes it),
//! hashed while it is written instead of read again afterwards.
//!
//! BLAKE3 is a tree over 1 KiB chunks. Every aligned, whole power-of-two run of chunks that
//! ends inside the input is a subtree of that tree; so is the input's first [`BLOCK`] bytes.
//! Each later block's chaining value is computed as its bytes come (many blocks at once on the
//! thread pool), the values merged as their subtrees complete, and once the first block is
//! given, it is merged with them up to the root. The result is the same as [`blake3::hash`] of
//! the whole input (tested on many lengths).

use blake3::hazmat::{ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
use rayon::prelude::*;

/// The first block's length, and the unit whose chaining values are computed (64 chunks).
pub const BLOCK: usize = 64 << 10;

/// A BLAKE3 over bytes `BLOCK..` given in order ([`HeadLastHasher::update`]), then bytes
/// `0..BLOCK` ([`HeadLastHasher::finish`]).
pub struct HeadLastHasher {
    /// Complete subtrees after the first block, left to right: (start, length, value). Their
    /// lengths shrink from left to right, each aligned to its length.
    stack: Vec<(u64, u64, ChainingValue)>,
    /// Bytes of the block being filled.
    partial: Vec<u8>,
    /// Where the next byte goes.
    pos: u64,
}

impl std::fmt::Debug for HeadLastHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadLastHasher").field("pos", &self.pos).finish_non_exhaustive()
    }
}

impl Default for HeadLastHasher {
    fn default() -> Self {
        HeadLastHasher { stack: Vec::new(), partial: Vec::with_capacity(BLOCK), pos: BLOCK as u64 }
    }
}

fn block_value(start: u64, data: &[u8]) -> ChainingValue {
    blake3::Hasher::new().set_input_offset(start).update(data).finalize_non_root()
}

impl HeadLastHasher {
    /// A hasher waiting for the bytes at `BLOCK` onwards.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the next byte of [`HeadLastHasher::update`] lies in the input.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next bytes, following those given before.
    pub fn update(&mut self, mut data: &[u8]) {
        if !self.partial.is_empty() {
            let n = (BLOCK - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.pos += n as u64;
            if self.partial.len() == BLOCK {
                let start = self.pos - BLOCK as u64;
                let value = block_value(start, &self.partial);
                self.partial.clear();
                self.push(start, value);
            }
        }
        let whole = data.len() / BLOCK * BLOCK;
        if whole > 0 {
            let first = self.pos;
            let values: Vec<ChainingValue> = data[..whole]
                .par_chunks(BLOCK)
                .enumerate()
                .map(|(i, b)| block_value(first + (i * BLOCK) as u64, b))
                .collect();
            for (i, value) in values.into_iter().enumerate() {
                self.push(first + (i * BLOCK) as u64, value);
            }
            self.pos += whole as u64;
            data = &data[whole..];
        }
        self.partial.extend_from_slice(data);
        self.pos += data.len() as u64;
    }

    /// Adds a whole block's value, merging the subtrees it completes (never the root: the
    /// first block is not among them).
    fn push(&mut self, start: u64, value: ChainingValue) {
        self.stack.push((start, BLOCK as u64, value));
        while let [.., (ls, ll, lv), (_, rl, rv)] = self.stack[..]
            && ll == rl
            && ls % (2 * ll) == 0
        {
            let merged = merge_subtrees_non_root(&lv, &rv, Mode::Hash);
            self.stack.truncate(self.stack.len() - 2);
            self.stack.push((ls, 2 * ll, merged));
        }
    }

    /// The hash of the whole input, `head` being its first [`BLOCK`] bytes (shorter only when
    /// nothing followed them).
    pub fn finish(mut self, head: &[u8]) -> blake3::Hash {
        if self.pos == BLOCK as u64 && self.partial.is_empty() {
            return blake3::hash(head);
        }
        assert_eq!(head.len(), BLOCK, "the first block is whole when bytes follow it");
        if !self.partial.is_empty() {
            let start = self.pos - self.partial.len() as u64;
            let value = block_value(start, &self.partial);
            self.stack.push((start, self.partial.len() as u64, value));
        }
        // The first block and the subtrees as long as it has grown, along the left edge.
        let (mut len, mut value) = (BLOCK as u64, block_value(0, head));
        let mut rest = self.stack.into_iter().peekable();
        while let Some(&(_, l, v)) = rest.peek()
            && l == len
        {
            rest.next();
            if rest.peek().is_none() {
                return merge_subtrees_root(&value, &v, Mode::Hash);
            }
            value = merge_subtrees_non_root(&value, &v, Mode::Hash);
            len *= 2;
        }
        // What is left is shorter each time: merged from the right, the last merge the root.
        let mut right: Vec<ChainingValue> = rest.map(|(_, _, v)| v).collect();
        let Some(mut acc) = right.pop() else {
            unreachable!("the input is longer than its first block, so something follows it")
        };
        while let Some(v) = right.pop() {
            acc = merge_subtrees_non_root(&v, &acc, Mode::Hash);
        }
        merge_subtrees_root(&value, &acc, Mode::Hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed).collect()
    }

    fn hashed_in(input: &[u8], pieces: &[usize]) -> blake3::Hash {
        let mut h = HeadLastHasher::new();
        let mut rest = &input[BLOCK.min(input.len())..];
        for &p in pieces.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = p.max(1).min(rest.len());
            h.update(&rest[..n]);
            rest = &rest[n..];
        }
        h.finish(&input[..BLOCK.min(input.len())])
    }

    #[test]
    fn the_hash_is_blake3_of_the_whole_input_at_the_lengths_where_the_tree_changes() {
        let b = BLOCK;
        let lens = [
            1,
            b - 1,
            b,
            b + 1,
            b + 1024,
            2 * b - 1,
            2 * b,
            2 * b + 1,
            3 * b,
            3 * b + 7,
            4 * b,
            4 * b + 1,
            5 * b + 4096,
            7 * b,
            8 * b,
            8 * b + 1,
            9 * b - 1,
            16 * b,
            17 * b + 3,
            33 * b + 65535,
        ];
        for len in lens {
            let input = data(len, 7);
            for pieces in [&[len][..], &[b][..], &[4096, b * 3, 1][..], &[512][..]] {
                assert_eq!(hashed_in(&input, pieces), blake3::hash(&input), "{len} bytes in pieces of {pieces:?}");
            }
        }
    }

    #[test]
    fn a_changed_head_or_tail_changes_the_hash() {
        let input = data(5 * BLOCK + 10, 1);
        let mut head = input[..BLOCK].to_vec();
        head[100] ^= 1;
        let mut h = HeadLastHasher::new();
        h.update(&input[BLOCK..]);
        assert_ne!(h.finish(&head), blake3::hash(&input));
        let mut h = HeadLastHasher::new();
        h.update(&input[BLOCK..input.len() - 1]);
        assert_ne!(h.finish(&input[..BLOCK]), blake3::hash(&input));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_length_in_any_pieces_hashes_as_blake3(len in 1usize..(40 * BLOCK), pieces in proptest::collection::vec(1usize..(3 * BLOCK), 1..6), seed: u8) {
            let input = data(len, seed);
            prop_assert_eq!(hashed_in(&input, &pieces), blake3::hash(&input));
        }
    }
}
