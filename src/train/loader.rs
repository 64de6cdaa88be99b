//! Background batch loading: worker threads decode and augment, the trainer receives batches
//! in step order. A batch is a pure function of (seed, step): the epoch permutation and each
//! image's augmentation are seeded from them, so a resumed run sees exactly the same data.
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
    pub fn start(
        ds: Arc<dyn Dataset>,
        pre: Preprocess,
        aug: Augment,
        batch: usize,
        seed: u64,
        steps: std::ops::Range<u64>,
        workers: usize,
    ) -> Self {
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
                        let mut pixels = vec![0u8; batch * per];
                        let mut labels = vec![-1i64; batch];
                        for j in 0..batch {
                            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5851_f42d_4c95_7f2d);
                            rng.set_stream(step * batch as u64 + j as u64);
                            let mut idx = perm[((step % spe) as usize * batch + j) % len];
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

    #[test]
    fn batches_arrive_in_order_and_are_reproducible() {
        let ds: Arc<dyn Dataset> = Arc::new(
            InMemory::new(
                (0..40u32 * 16).map(|v| (v % 251) as u8).collect(),
                4,
                4,
                1,
                Some((0..40).collect()),
                vec![],
                "t".into(),
            )
            .unwrap(),
        );
        let pre = Preprocess {
            image_size: 4,
            resize: crate::data::ResizeRule::Stretch,
            ..Preprocess::imagenet(4)
        };
        let mut a = Loader::start(ds.clone(), pre.clone(), Augment::default(), 8, 5, 3..9, 3);
        let got: Vec<Batch> = std::iter::from_fn(|| a.next_batch()).collect();
        assert_eq!(
            got.iter().map(|b| b.step).collect::<Vec<_>>(),
            (3..9).collect::<Vec<_>>()
        );
        // resuming at step 6 gives the same batch 6
        let mut b = Loader::start(ds, pre, Augment::default(), 8, 5, 6..7, 2);
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
}
