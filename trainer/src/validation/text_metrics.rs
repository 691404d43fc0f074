//! Text similarity measures for voice consistency: chrF (Popović 2015), ROUGE-L (Lin
//! 2004) and the cosine similarity of character n-gram profiles.

use std::collections::HashMap;

/// Character n-grams of `text` with whitespace removed, as chrF counts them.
fn char_ngrams(chars: &[char], n: usize) -> HashMap<&[char], usize> {
    let mut counts = HashMap::new();
    if chars.len() >= n {
        for gram in chars.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

/// chrF with character n-grams of order 1 to 6 and β = 2 (recall weighted twice), on a
/// 0–100 scale as sacreBLEU reports it. Whitespace is ignored.
pub fn chrf(hypothesis: &str, reference: &str) -> f64 {
    const MAX_ORDER: usize = 6;
    const BETA_SQUARED: f64 = 4.0;
    let hyp: Vec<char> = hypothesis.chars().filter(|c| !c.is_whitespace()).collect();
    let reference: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
    let (mut precision_sum, mut recall_sum, mut orders) = (0.0, 0.0, 0);
    for n in 1..=MAX_ORDER {
        let (h, r) = (char_ngrams(&hyp, n), char_ngrams(&reference, n));
        let (h_total, r_total): (usize, usize) = (h.values().sum(), r.values().sum());
        if h_total == 0 || r_total == 0 {
            continue;
        }
        let matched: usize = h
            .iter()
            .map(|(gram, count)| (*count).min(r.get(gram).copied().unwrap_or(0)))
            .sum();
        precision_sum += matched as f64 / h_total as f64;
        recall_sum += matched as f64 / r_total as f64;
        orders += 1;
    }
    if orders == 0 {
        return if hyp == reference { 100.0 } else { 0.0 };
    }
    let (precision, recall) = (precision_sum / orders as f64, recall_sum / orders as f64);
    if precision + recall == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + BETA_SQUARED) * precision * recall / (BETA_SQUARED * precision + recall)
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || (c.is_ascii_punctuation() && c != '\''))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// ROUGE-L F1 (0–1): the longest common subsequence of lowercased words.
pub fn rouge_l(hypothesis: &str, reference: &str) -> f64 {
    let (h, r) = (words(hypothesis), words(reference));
    if h.is_empty() || r.is_empty() {
        return if h.is_empty() && r.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    // One row of the LCS table at a time.
    let mut previous = vec![0usize; r.len() + 1];
    for word in &h {
        let mut current = vec![0usize; r.len() + 1];
        for (j, other) in r.iter().enumerate() {
            current[j + 1] = if word == other {
                previous[j] + 1
            } else {
                current[j].max(previous[j + 1])
            };
        }
        previous = current;
    }
    let lcs = previous[r.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (precision, recall) = (lcs / h.len() as f64, lcs / r.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

/// Character trigram counts over many texts (lowercased): a style profile.
pub fn trigram_profile<'a>(texts: impl IntoIterator<Item = &'a str>) -> HashMap<String, f64> {
    let mut profile = HashMap::new();
    for text in texts {
        let chars: Vec<char> = text.to_lowercase().chars().collect();
        for gram in chars.windows(3) {
            *profile.entry(gram.iter().collect()).or_insert(0.0) += 1.0;
        }
    }
    profile
}

/// Cosine similarity (0–1) of two profiles; 0 when either is empty.
pub fn cosine(a: &HashMap<String, f64>, b: &HashMap<String, f64>) -> f64 {
    let dot: f64 = a
        .iter()
        .filter_map(|(gram, x)| b.get(gram).map(|y| x * y))
        .sum();
    let norm = |p: &HashMap<String, f64>| p.values().map(|v| v * v).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// The value at quantile `q` (0–1) of sorted `values`, by nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_texts_score_full_marks() {
        let text = "I hear you, that sounds really hard.";
        assert!((chrf(text, text) - 100.0).abs() < 1e-9);
        assert!((rouge_l(text, text) - 1.0).abs() < 1e-12);
        let profile = trigram_profile([text]);
        assert!((cosine(&profile, &profile) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn unrelated_texts_score_low_and_partial_overlap_in_between() {
        assert_eq!(chrf("xyz", "abc"), 0.0);
        assert_eq!(rouge_l("alpha beta", "gamma delta"), 0.0);
        // LCS "the cat sat" (3 of 4 and 3 of 3 words): P 3/4, R 1, F1 6/7.
        let f1 = rouge_l("the cat sat down", "The cat, sat.");
        assert!((f1 - 6.0 / 7.0).abs() < 1e-12, "{f1}");
        let partial = chrf("the cat sat on the mat", "the cat sat");
        assert!(partial > 30.0 && partial < 100.0, "{partial}");
    }

    #[test]
    fn chrf_weights_recall_over_precision() {
        // A reply missing half the reference loses more than one with extra text.
        let reference = "take a slow breath and tell me more";
        let short = chrf("take a slow breath", reference);
        let long = chrf(
            "take a slow breath and tell me more about your day please",
            reference,
        );
        assert!(long > short, "{long} vs {short}");
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let values = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&values, 0.5), 2.0);
        assert_eq!(quantile(&values, 0.9), 4.0);
        assert_eq!(quantile(&values, 0.0), 1.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
