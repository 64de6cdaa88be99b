//! Evaluation metrics shared by the trainer's monitors and the tools.

/// Weighted kNN classification (DINO): cosine similarity on L2-normalised features, top-k
/// neighbours vote with weight exp(sim / T). Returns top-1 accuracy on the query set.
pub fn knn_top1(
    (train, train_labels): (&[f32], &[usize]),
    (test, test_labels): (&[f32], &[usize]),
    dim: usize,
    classes: usize,
    k: usize,
    temperature: f32,
) -> f64 {
    use rayon::prelude::*;
    let ntr = train_labels.len();
    let correct: usize = test
        .par_chunks(dim)
        .zip(test_labels.par_iter())
        .map(|(q, &y)| {
            let mut sims: Vec<(f32, usize)> = (0..ntr)
                .map(|i| (dot(q, &train[i * dim..(i + 1) * dim]), train_labels[i]))
                .collect();
            let k = k.min(ntr);
            sims.select_nth_unstable_by(k.saturating_sub(1), |a, b| b.0.total_cmp(&a.0));
            let mut votes = vec![0f32; classes];
            for &(s, l) in &sims[..k] {
                votes[l] += (s / temperature).exp();
            }
            let pred = votes
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap_or(0);
            (pred == y) as usize
        })
        .sum();
    correct as f64 / test_labels.len().max(1) as f64
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// L2-normalise rows of a `[n, dim]` matrix in place.
pub fn l2_normalize_rows(x: &mut [f32], dim: usize) {
    for row in x.chunks_mut(dim) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knn_perfect_and_wrong() {
        let train = vec![1.0, 0.0, 0.0, 1.0];
        let labels = vec![0, 1];
        let test = vec![0.9, 0.1, 0.1, 0.9];
        assert_eq!(
            knn_top1((&train, &labels), (&test, &[0, 1]), 2, 2, 1, 0.07),
            1.0
        );
        assert_eq!(
            knn_top1((&train, &labels), (&test, &[1, 0]), 2, 2, 1, 0.07),
            0.0
        );
    }
}
