//! Background batch loading: worker threads decode and augment, the trainer receives batches
//! in step order. A batch is a pure function of (seed, step): the epoch permutation and each
//! image's augmentation are seeded from them, so a resumed run sees exactly the same data.
//! Data-parallel ranks each take their `Shard` of every step's global batch (DistributedSampler
//! semantics: one shuffle per epoch shared by all ranks, each image once per epoch, the last
//! incomplete batch dropped); an image's augmentation depends on its global slot, not the rank.
use crate::data::{Augment, Dataset, Preprocess};
use crossbeam_channel::{bounded, Receiver};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// CHW bytes for `batch` images, plus labels where the data set has them.
pub struct Batch {
    pub step: u64,
    pub pixels: Vec<u8>,
    pub labels: Vec<i64>,
}

pub struct Loader {
    rx: Receiver<Batch>,
    pending: BTreeMap<u64, Batch>,
    next: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

/// This process's part of every step's batch: slots `rank·batch/world ..` of the global batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// One process: the whole batch.
    pub const ALL: Shard = Shard { rank: 0, world: 1 };

    /// Images of a global `batch` this rank loads (`batch` must divide by `world`).
    pub fn local(&self, batch: usize) -> usize {
        batch / self.world
    }

    /// Global slot of this rank's first image in every batch.
    pub fn first(&self, batch: usize) -> usize {
        self.rank * self.local(batch)
    }
}

/// Which data-set item fills slot `j` of the batch for `step` (the workers' mapping, for tests).
#[cfg(test)]
fn item_for(len: usize, batch: usize, seed: u64, step: u64, j: usize) -> usize {
    let spe = (len / batch).max(1) as u64;
    epoch_perm(len, seed, step / spe)[((step % spe) as usize * batch + j) % len]
}

/// The shuffled order of the data set for one epoch.
fn epoch_perm(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..len).collect();
    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ epoch,
    ));
    perm
}

impl Loader {
    /// `shard`'s part of the global `batch` of every step in `steps` (`Shard::ALL`: the whole
    /// batch, one process).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        ds: Arc<dyn Dataset>,
        pre: Preprocess,
        aug: Augment,
        batch: usize,
        seed: u64,
        steps: std::ops::Range<u64>,
        workers: usize,
        shard: Shard,
    ) -> Self {
        assert!(
            shard.world >= 1 && shard.rank < shard.world && batch.is_multiple_of(shard.world),
            "a shard of the batch: {shard:?} of {batch}"
        );
        let (local, first) = (shard.local(batch), shard.first(batch));
        let (start, end) = (steps.start, steps.end);
        let (tx, rx) = bounded::<Batch>(workers * 2);
        let counter = Arc::new(AtomicU64::new(start));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let warned = Arc::new(std::sync::Mutex::new(
            std::collections::HashSet::<usize>::new(),
        ));
        let handles = (0..workers)
            .map(|_| {
                let (ds, pre, aug, tx, counter, stop, warned) = (
                    ds.clone(),
                    pre.clone(),
                    aug.clone(),
                    tx.clone(),
                    counter.clone(),
                    stop.clone(),
                    warned.clone(),
                );
                std::thread::spawn(move || {
                    let len = ds.len();
                    let spe = (len / batch).max(1) as u64;
                    let per = pre.tensor_len();
                    let mut perm_cache: Option<(u64, Vec<usize>)> = None;
                    loop {
                        let step = counter.fetch_add(1, Ordering::SeqCst);
                        if step >= end || stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let epoch = step / spe;
                        if perm_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
                            perm_cache = Some((epoch, epoch_perm(len, seed, epoch)));
                        }
                        let perm = &perm_cache.as_ref().unwrap().1;
                        let mut pixels = vec![0u8; local * per];
                        let mut labels = vec![-1i64; local];
                        for j in 0..local {
                            let g = first + j; // the image's slot in the global batch
                            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5851_f42d_4c95_7f2d);
                            rng.set_stream(step * batch as u64 + g as u64);
                            let mut idx = perm[((step % spe) as usize * batch + g) % len];
                            // A corrupt file is reported once and replaced by its neighbour.
                            let img = loop {
                                match ds.image(idx) {
                                    Ok(img) => break img,
                                    Err(e) => {
                                        if warned.lock().unwrap().insert(idx) {
                                            eprintln!("warning: skipping {e}");
                                        }
                                        idx = (idx + 1) % len;
                                    }
                                }
                            };
                            pre.train_u8_into(
                                &img,
                                &aug,
                                &mut rng,
                                &mut pixels[j * per..(j + 1) * per],
                            );
                            labels[j] = ds.label(idx).map_or(-1, |l| l as i64);
                        }
                        if tx
                            .send(Batch {
                                step,
                                pixels,
                                labels,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                })
            })
            .collect();
        Loader {
            rx,
            pending: BTreeMap::new(),
            next: start,
            stop,
            workers: handles,
        }
    }

    /// The batch for the next step, in order. `None` when the loader has finished.
    pub fn next_batch(&mut self) -> Option<Batch> {
        loop {
            if let Some(b) = self.pending.remove(&self.next) {
                self.next += 1;
                return Some(b);
            }
            match self.rx.recv() {
                Ok(b) => {
                    self.pending.insert(b.step, b);
                }
                Err(_) => return None,
            }
        }
    }
}

#[cfg(test)]
impl Loader {
    fn collect_all(mut self) -> Vec<Batch> {
        std::iter::from_fn(|| self.next_batch()).collect()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        while self.rx.try_recv().is_ok() {}
        for h in self.workers.drain(..) {
            // Workers blocked on a full channel wake when we drain it or drop the receiver.
            while !h.is_finished() {
                while self.rx.try_recv().is_ok() {}
                std::thread::yield_now();
            }
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::InMemory;

    /// `n` grey 4×4 images labelled with their own index, and a preprocessing that keeps 4×4.
    fn indexed_set(n: u32, pattern: impl Fn(u32) -> u32) -> (Arc<dyn Dataset>, Preprocess) {
        let ds = InMemory::new(
            (0..n * 16).map(|v| (pattern(v) % 251) as u8).collect(),
            4,
            4,
            1,
            Some((0..n as usize).collect()),
            vec![],
            "t".into(),
        )
        .unwrap();
        let pre = Preprocess {
            image_size: 4,
            resize: crate::data::ResizeRule::Stretch,
            ..Preprocess::imagenet(4)
        };
        (Arc::new(ds), pre)
    }

    #[test]
    fn batches_arrive_in_order_and_are_reproducible() {
        let (ds, pre) = indexed_set(40, |v| v);
        let mut a = Loader::start(
            ds.clone(),
            pre.clone(),
            Augment::default(),
            8,
            5,
            3..9,
            3,
            Shard::ALL,
        );
        let got: Vec<Batch> = std::iter::from_fn(|| a.next_batch()).collect();
        assert_eq!(
            got.iter().map(|b| b.step).collect::<Vec<_>>(),
            (3..9).collect::<Vec<_>>()
        );
        // resuming at step 6 gives the same batch 6
        let mut b = Loader::start(ds, pre, Augment::default(), 8, 5, 6..7, 2, Shard::ALL);
        let again = b.next_batch().unwrap();
        assert_eq!(again.pixels, got[3].pixels);
        assert_eq!(again.labels, got[3].labels);
        // one epoch = 5 steps covers every item once
        let mut seen: Vec<usize> = (0..5)
            .flat_map(|s| (0..8).map(move |j| item_for(40, 8, 5, s, j)))
            .collect();
        seen.sort();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn ranks_split_each_batch_and_together_see_each_image_once_per_epoch() {
        let (ds, pre) = indexed_set(42, |v| v * 7);
        let aug = Augment::default();
        // 42 images, global batch 12: 3 steps per epoch, 6 images dropped; two epochs
        let whole: Vec<Batch> = Loader::start(
            ds.clone(),
            pre.clone(),
            aug.clone(),
            12,
            9,
            0..6,
            2,
            Shard::ALL,
        )
        .collect_all();
        let ranks: Vec<Vec<Batch>> = (0..3)
            .map(|rank| {
                Loader::start(
                    ds.clone(),
                    pre.clone(),
                    aug.clone(),
                    12,
                    9,
                    0..6,
                    2,
                    Shard { rank, world: 3 },
                )
                .collect_all()
            })
            .collect();
        for (s, w) in whole.iter().enumerate() {
            // the ranks' parts, in rank order, are the one-process batch: same images, same crops
            let joined: Vec<u8> = ranks.iter().flat_map(|r| r[s].pixels.clone()).collect();
            assert_eq!(joined, w.pixels, "step {s}");
            let labels: Vec<i64> = ranks.iter().flat_map(|r| r[s].labels.clone()).collect();
            assert_eq!(labels, w.labels);
            assert!(ranks.iter().all(|r| r[s].labels.len() == 4));
        }
        for epoch in 0..2 {
            // labels are item indices here: each image at most once per epoch, 36 of 42 seen
            let mut seen: Vec<i64> = ranks
                .iter()
                .flat_map(|r| {
                    r[epoch * 3..epoch * 3 + 3]
                        .iter()
                        .flat_map(|b| b.labels.clone())
                })
                .collect();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), 36, "epoch {epoch}");
        }
    }
}
