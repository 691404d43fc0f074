//! Seeded randomness: a small generator for initialisation and shuffling, and
//! counter-based dropout masks keyed by (seed, step, micro-batch, module), which need no
//! state at all, so a resumed run draws exactly the masks the uninterrupted run would have.

use trainer_kernels::dropout::{splitmix64 as mix, GOLDEN};

/// SplitMix64 (Steele, Lea, Flood 2014): fast, and good enough for initialisation and
/// shuffling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [low, high).
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.next_f64()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// Which dropout masks a forward pass draws: those of (seed, optimizer step, micro-batch).
/// Masks are counter-based, a pure function of this key, the module and the element's
/// index, so they need no generator state: a resumed run, or another device computing the
/// same formula, draws the same masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub step: u64,
    pub micro_batch: u64,
}

impl DropoutKey {
    /// The mask stream of the module named by `module` (see [`module_id`]): the masks'
    /// entries are `trainer_kernels::dropout::mask(stream, …)`, drawn where the tensor is.
    pub fn stream(&self, module: u64) -> u64 {
        mix(mix(mix(self.seed ^ 0xD50F_0D0F) ^ self.step) ^ self.micro_batch) ^ module
    }
}

/// A module's part of its dropout key: FNV-1a of its name (`model.layers.3.mlp.up_proj`).
pub fn module_id(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    impl DropoutKey {
        fn mask(&self, module: u64, count: usize, keep: f64) -> Vec<f32> {
            trainer_kernels::dropout::mask(self.stream(module), count, keep)
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_numbers() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let first: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        assert_eq!(first, (0..5).map(|_| b.next_u64()).collect::<Vec<_>>());
        let x = Rng::new(7).uniform(-0.5, 0.5);
        assert!((-0.5..0.5).contains(&x));
    }

    #[test]
    fn dropout_masks_are_a_function_of_their_key() {
        let key = DropoutKey {
            seed: 42,
            step: 3,
            micro_batch: 1,
        };
        let module = module_id("base_model.model.model.layers.0.self_attn.q_proj");
        let mask = key.mask(module, 10_000, 0.9);
        assert_eq!(
            mask,
            key.mask(module, 10_000, 0.9),
            "the same key, the same mask"
        );
        let kept = mask.iter().filter(|m| **m > 0.0).count();
        assert!((8_800..9_200).contains(&kept), "about 90% kept: {kept}");
        assert!(mask
            .iter()
            .all(|m| *m == 0.0 || (*m - 1.0 / 0.9).abs() < 1e-6));
        for other in [
            DropoutKey { step: 4, ..key }.mask(module, 10_000, 0.9),
            DropoutKey {
                micro_batch: 2,
                ..key
            }
            .mask(module, 10_000, 0.9),
            DropoutKey { seed: 43, ..key }.mask(module, 10_000, 0.9),
            key.mask(
                module_id("base_model.model.model.layers.1.self_attn.q_proj"),
                10_000,
                0.9,
            ),
        ] {
            assert_ne!(other, mask, "another key, another mask");
        }
        // A longer mask starts with the shorter one: the element's index is the counter.
        assert_eq!(key.mask(module, 20_000, 0.9)[..10_000], mask[..]);
    }
}
