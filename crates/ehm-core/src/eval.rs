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

/// Confusion matrix `cm[truth][pred]`.
pub fn confusion(truth: &[i64], pred: &[i64], classes: usize) -> Vec<Vec<u64>> {
    let mut cm = vec![vec![0u64; classes]; classes];
    for (&t, &p) in truth.iter().zip(pred) {
        cm[t as usize][p as usize] += 1;
    }
    cm
}

/// Recall per class (NaN-free: a class with no examples gets 0).
pub fn per_class_accuracy(cm: &[Vec<u64>]) -> Vec<f64> {
    cm.iter()
        .enumerate()
        .map(|(i, row)| {
            let n: u64 = row.iter().sum();
            if n == 0 {
                0.0
            } else {
                row[i] as f64 / n as f64
            }
        })
        .collect()
}

/// CSV with a header row of predicted classes and one row per true class.
pub fn confusion_csv(cm: &[Vec<u64>], names: &[String]) -> String {
    let mut header = vec!["truth\\pred".to_string()];
    header.extend(names.iter().cloned());
    let mut out = crate::output::csv_row(&header);
    for (i, row) in cm.iter().enumerate() {
        let mut fields = vec![names[i].clone()];
        fields.extend(row.iter().map(|v| v.to_string()));
        out += &crate::output::csv_row(&fields);
    }
    out
}

/// A heat-map picture of the row-normalised confusion matrix (24 px per cell).
pub fn confusion_png(cm: &[Vec<u64>]) -> image::RgbImage {
    let c = cm.len() as u32;
    let cell = 24;
    let mut img = image::RgbImage::new(c * cell, c * cell);
    for (i, row) in cm.iter().enumerate() {
        let n = row.iter().sum::<u64>().max(1) as f64;
        for (j, &v) in row.iter().enumerate() {
            let f = v as f64 / n;
            let px = if i == j {
                [(255.0 * (1.0 - f)) as u8, 255, (255.0 * (1.0 - f)) as u8]
            } else {
                [255, (255.0 * (1.0 - f)) as u8, (255.0 * (1.0 - f)) as u8]
            };
            for y in 0..cell - 1 {
                for x in 0..cell - 1 {
                    img.put_pixel(j as u32 * cell + x, i as u32 * cell + y, image::Rgb(px));
                }
            }
        }
    }
    img
}

#[cfg(test)]
mod confusion_tests {
    use super::*;

    #[test]
    fn perfect_all_wrong_and_missing_class() {
        let cm = confusion(&[0, 1, 2], &[0, 1, 2], 3);
        assert_eq!(per_class_accuracy(&cm), vec![1.0, 1.0, 1.0]);
        let cm = confusion(&[0, 1, 2], &[1, 2, 0], 3);
        assert_eq!(per_class_accuracy(&cm), vec![0.0, 0.0, 0.0]);
        // class 2 never appears in the truth: accuracy 0, not NaN; its column still counts
        let cm = confusion(&[0, 0, 1], &[0, 2, 1], 3);
        assert_eq!(per_class_accuracy(&cm), vec![0.5, 1.0, 0.0]);
        assert_eq!(cm[0][2], 1);
        let csv = confusion_csv(&cm, &["a".into(), "b\"x".into(), "c".into()]);
        assert!(
            csv.starts_with("truth\\pred,a,\"b\"\"x\",c\na,1,0,1\n"),
            "{csv}"
        );
    }
}

/// Segmentation scores from per-pixel class indices.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SegScores {
    /// Mean IoU over the classes that occur in the truth or the prediction.
    pub miou: f64,
    /// IoU per class; `None` for a class absent from both truth and prediction.
    pub per_class_iou: Vec<Option<f64>>,
    pub pixel_accuracy: f64,
}

/// Accumulates an intersection/union table over many images; `ignore` pixels of the truth
/// (e.g. 255) count nowhere.
#[derive(Clone, Debug)]
pub struct SegMeter {
    classes: usize,
    ignore: Option<u8>,
    /// confusion[truth][pred]
    confusion: Vec<Vec<u64>>,
}

impl SegMeter {
    pub fn new(classes: usize, ignore: Option<u8>) -> Self {
        SegMeter {
            classes,
            ignore,
            confusion: vec![vec![0; classes]; classes],
        }
    }

    pub fn add(&mut self, truth: &[u8], pred: &[u8]) {
        assert_eq!(
            truth.len(),
            pred.len(),
            "truth and prediction differ in size"
        );
        for (&t, &p) in truth.iter().zip(pred) {
            if Some(t) == self.ignore {
                continue;
            }
            let (t, p) = (t as usize, p as usize);
            if t < self.classes && p < self.classes {
                self.confusion[t][p] += 1;
            }
        }
    }

    pub fn scores(&self) -> SegScores {
        let c = self.classes;
        let mut per_class = Vec::with_capacity(c);
        for k in 0..c {
            let tp = self.confusion[k][k];
            let fn_: u64 = self.confusion[k].iter().sum::<u64>() - tp;
            let fp: u64 = (0..c).map(|t| self.confusion[t][k]).sum::<u64>() - tp;
            let union = tp + fn_ + fp;
            per_class.push((union > 0).then(|| tp as f64 / union as f64));
        }
        let present: Vec<f64> = per_class.iter().flatten().copied().collect();
        let total: u64 = self.confusion.iter().flatten().sum();
        let correct: u64 = (0..c).map(|k| self.confusion[k][k]).sum();
        SegScores {
            miou: if present.is_empty() {
                0.0
            } else {
                present.iter().sum::<f64>() / present.len() as f64
            },
            per_class_iou: per_class,
            pixel_accuracy: if total == 0 {
                0.0
            } else {
                correct as f64 / total as f64
            },
        }
    }
}

#[cfg(test)]
mod seg_tests {
    use super::*;

    #[test]
    fn perfect_all_wrong_missing_class_and_ignore() {
        let truth = [0u8, 0, 1, 1, 2, 2];
        let mut m = SegMeter::new(3, Some(255));
        m.add(&truth, &truth);
        let s = m.scores();
        assert_eq!((s.miou, s.pixel_accuracy), (1.0, 1.0));

        let mut m = SegMeter::new(3, None);
        m.add(&truth, &[1, 1, 2, 2, 0, 0]);
        let s = m.scores();
        assert_eq!((s.miou, s.pixel_accuracy), (0.0, 0.0));

        // class 2 absent from truth and prediction: excluded from the mean, reported as None
        let mut m = SegMeter::new(3, None);
        m.add(&[0, 0, 1, 1], &[0, 1, 1, 1]);
        let s = m.scores();
        assert_eq!(s.per_class_iou[2], None);
        assert_eq!(s.per_class_iou[0], Some(0.5)); // tp 1, fn 1
        assert!((s.per_class_iou[1].unwrap() - 2.0 / 3.0).abs() < 1e-12); // tp 2, fp 1
        assert!((s.miou - (0.5 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(s.pixel_accuracy, 0.75);

        // ignored truth pixels count nowhere, whatever is predicted there
        let mut m = SegMeter::new(2, Some(255));
        m.add(&[0, 255, 1, 255], &[0, 1, 1, 0]);
        let s = m.scores();
        assert_eq!((s.miou, s.pixel_accuracy), (1.0, 1.0));
    }
}
