//! Secure aggregation by pairwise additive masks (Bonawitz et al. 2017, the semi-honest
//! variant without secret sharing).
//!
//! Each round (and each masking attempt of it) every site makes a fresh X25519 key pair and
//! publishes the public key through the coordinator. Sites i and j derive the same seed
//! `s_ij = SHA-256(domain ‖ X25519(sk_i, pk_j) ‖ run ‖ experiment ‖ round ‖ attempt ‖ i ‖ j)`
//! and expand it with ChaCha20 into one u32 per model value. Site i adds the stream for every
//! j > i and subtracts it for every j < i, modulo 2^32, on top of its fixed-point update. In
//! the sum over the whole mask set every stream appears once with + and once with −, so the
//! masks cancel exactly; any single masked update is uniformly random to the coordinator.
//!
//! Dropout: if a site of the mask set never delivers, its masks cannot be removed. Instead
//! of Bonawitz's secret-shared mask recovery the coordinator redoes the round's masking
//! without it (a new attempt, new keys). The coordinator is trusted to relay keys honestly
//! (an actively malicious relay could substitute keys; signing them with the site
//! certificates would close that, and is not done here).

use rand::RngCore;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::error::{Error, Result};
use crate::ids::SiteId;

/// Everything that makes one masking attempt's seeds unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskContext {
    pub run_id: String,
    pub experiment: String,
    pub round: u32,
    pub attempt: u32,
}

/// A site's key pair for one masking attempt.
pub struct MaskingKey {
    secret: StaticSecret,
    pub public: [u8; 32],
}

impl std::fmt::Debug for MaskingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskingKey").field("public", &hex::encode(self.public)).finish_non_exhaustive()
    }
}

impl MaskingKey {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    fn pair_seed(&self, peer_public: &[u8; 32], me: &SiteId, peer: &SiteId, ctx: &MaskContext) -> [u8; 32] {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        let (a, b) = if me < peer { (me, peer) } else { (peer, me) };
        let mut h = Sha256::new();
        h.update(b"aln-secagg-v1\0");
        h.update(shared.as_bytes());
        for part in [ctx.run_id.as_str(), ctx.experiment.as_str(), a.as_str(), b.as_str()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(ctx.round.to_le_bytes());
        h.update(ctx.attempt.to_le_bytes());
        h.finalize().into()
    }

    /// Adds this site's pairwise masks to its ring words. `peers` is the whole mask set
    /// (this site included, which is skipped), as relayed by the coordinator.
    pub fn mask(&self, words: &mut [u32], me: &SiteId, peers: &[(SiteId, [u8; 32])], ctx: &MaskContext) -> Result<()> {
        if !peers.iter().any(|(s, k)| s == me && *k == self.public) {
            return Err(Error::InvalidUpdate(format!("the mask set does not hold {me}'s current key")));
        }
        let mut stream = vec![0u32; 1 << 14];
        for (peer, key) in peers.iter().filter(|(s, _)| s != me) {
            let mut prg = ChaCha20Rng::from_seed(self.pair_seed(key, me, peer, ctx));
            let add = me < peer;
            for part in words.chunks_mut(stream.len()) {
                let s = &mut stream[..part.len()];
                prg.fill_bytes(bytemuck::cast_slice_mut(s));
                if add {
                    part.iter_mut().zip(s.iter()).for_each(|(w, m)| *w = w.wrapping_add(*m));
                } else {
                    part.iter_mut().zip(s.iter()).for_each(|(w, m)| *w = w.wrapping_sub(*m));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{ring_decode, ring_encode};

    fn ctx() -> MaskContext {
        MaskContext { run_id: "r".into(), experiment: "main".into(), round: 1, attempt: 0 }
    }

    /// Three sites mask real-looking updates; returns (true deltas, masked words, set).
    fn three_sites(n: usize) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
        let sites: Vec<SiteId> = ["site-a", "site-b", "site-c"].iter().map(|s| SiteId::new(*s).unwrap()).collect();
        let keys: Vec<MaskingKey> = sites.iter().map(|_| MaskingKey::generate()).collect();
        let set: Vec<(SiteId, [u8; 32])> = sites.iter().cloned().zip(keys.iter().map(|k| k.public)).collect();
        let mut deltas = vec![];
        let mut masked = vec![];
        for (i, (site, key)) in sites.iter().zip(&keys).enumerate() {
            let delta: Vec<f32> = (0..n).map(|j| ((j * 7 + i * 13) % 101) as f32 * 1e-3 - 0.05).collect();
            let (mut words, _) = ring_encode(&delta, 1.0, 16);
            key.mask(&mut words, site, &set, &ctx()).unwrap();
            deltas.push(delta);
            masked.push(words);
        }
        (deltas, masked)
    }

    #[test]
    fn masks_cancel_in_the_sum_and_hide_each_update() {
        let n = 50_000;
        let (deltas, masked) = three_sites(n);
        // The sum is exact: equal, word for word, to the sum of the unmasked fixed-point values.
        for j in 0..n {
            let sum = masked.iter().fold(0u32, |s, m| s.wrapping_add(m[j]));
            let plain = deltas.iter().fold(0u32, |s, d| s.wrapping_add(ring_encode(&[d[j]], 1.0, 16).0[0]));
            assert_eq!(sum, plain, "value {j}");
            let want: f64 = deltas.iter().map(|d| f64::from(d[j])).sum();
            assert!((ring_decode(sum, 16) - want).abs() < 3.0 / 65536.0);
        }
        // Each masked update alone says nothing about its delta: read as fixed point it is
        // spread over the whole ring (values ~ ±2^15 where the delta is ±0.05), and it does
        // not correlate with the true delta.
        for (d, m) in deltas.iter().zip(&masked) {
            let seen: Vec<f64> = m.iter().map(|&w| ring_decode(w, 16)).collect();
            let mean_abs = seen.iter().map(|v| v.abs()).sum::<f64>() / n as f64;
            assert!(mean_abs > 10_000.0, "{mean_abs}");
            let dm = d.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            let sm = seen.iter().sum::<f64>() / n as f64;
            let cov: f64 = d.iter().zip(&seen).map(|(&a, &b)| (f64::from(a) - dm) * (b - sm)).sum();
            let va: f64 = d.iter().map(|&a| (f64::from(a) - dm).powi(2)).sum();
            let vb: f64 = seen.iter().map(|&b| (b - sm).powi(2)).sum();
            let r = cov / (va * vb).sqrt();
            assert!(r.abs() < 0.03, "correlation {r}");
        }
        // Two of three masked updates still do not reveal anything: their sum keeps the
        // masks shared with the third site.
        let partial: Vec<f64> = (0..n).map(|j| ring_decode(masked[0][j].wrapping_add(masked[1][j]), 16)).collect();
        assert!(partial.iter().map(|v| v.abs()).sum::<f64>() / n as f64 > 10_000.0);
    }

    #[test]
    fn a_stale_or_foreign_key_set_is_refused() {
        let me = SiteId::new("site-a").unwrap();
        let key = MaskingKey::generate();
        let other = MaskingKey::generate();
        let set = vec![(me.clone(), other.public)];
        assert!(key.mask(&mut [0u32; 4], &me, &set, &ctx()).is_err());
    }
}
