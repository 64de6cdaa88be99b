//! The dot product that HNSW search and exact search spend their time in, with explicit AVX2 /
//! AVX-512 kernels picked at run time (several independent FMA accumulators: one accumulator is a
//! serial chain of dependent adds, and float reassociation is not the compiler's to do), and a
//! cache prefetch hint for the vectors a search is about to read.

/// The widest vector instructions this CPU offers for the kernels below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2Fma,
    Portable,
}

/// Detected at run time (std caches the CPU query, so this is cheap to call).
pub fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Level::Avx2Fma;
        }
    }
    Level::Portable
}

/// Σ a[i]·b[i] over the shorter length, with the fastest kernel this CPU has.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    match level() {
        // SAFETY: `level` found the features these functions are compiled for.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2Fma => unsafe { dot_avx2(a, b) },
        _ => dot_portable(a, b),
    }
}

/// 16 independent lanes the compiler vectorises with whatever the target has.
#[inline(always)]
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Four 8-wide FMA accumulators (32 floats per step).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut s = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (loads): every access is below `n`, the shorter length.
    while i + 32 <= n {
        for (k, acc) in s.iter_mut().enumerate() {
            let o = i + 8 * k;
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        s[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
    let mut sum = _mm_cvtss_f32(h);
    while i < n {
        sum += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    sum
}

/// Four 16-wide FMA accumulators (64 floats per step).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut s = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (loads): every access is below `n`, the shorter length.
    while i + 64 <= n {
        for (k, acc) in s.iter_mut().enumerate() {
            let o = i + 16 * k;
            *acc = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(o)), _mm512_loadu_ps(pb.add(o)), *acc);
        }
        i += 64;
    }
    while i + 16 <= n {
        s[0] = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s[0]);
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(s[0], s[1]),
        _mm512_add_ps(s[2], s[3]),
    ));
    while i < n {
        sum += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    sum
}

/// Hint the CPU to start loading `v[start..start + len]` into cache (one hint per 64-byte line).
#[inline(always)]
pub fn prefetch(v: &[f32], start: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let end = (start + len).min(v.len());
        let mut i = start;
        while i < end {
            // SAFETY: `i` is in bounds; a prefetch never faults and changes no state.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(v.as_ptr().add(i) as *const i8) };
            i += 16;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, start, len);
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_kernel_matches_the_plain_sum() {
        for n in [
            0usize, 1, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 383, 384, 768,
        ] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n + 3).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let close = |v: f32| (v as f64 - plain).abs() < 1e-4;
            assert!(close(super::dot(&a, &b)), "dot {n}");
            assert!(close(super::dot_portable(&a, &b)), "portable {n}");
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    assert!(close(unsafe { super::dot_avx2(&a, &b) }), "avx2 {n}");
                }
                if std::is_x86_feature_detected!("avx512f") {
                    assert!(close(unsafe { super::dot_avx512(&a, &b) }), "avx512 {n}");
                }
            }
        }
    }
}
