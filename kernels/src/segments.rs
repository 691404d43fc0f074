//! How the rows of a batch divide into sequences. A padded row holds one sequence and
//! then padding; a packed row holds several sequences back to back, each attending only
//! within itself and counting its positions from 0.

/// Each row's segment lengths, in order; the rest of a row is padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    rows: Vec<Vec<usize>>,
}

/// For every position of every row (B·L entries): the first key it may see, and one past
/// the last query that may see it. Queries of the padding see the last segment, as a
/// padded row's padding sees its one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub starts: Vec<u32>,
    pub ends: Vec<u32>,
}

impl Segments {
    /// One sequence per row, of these lengths.
    pub fn unpacked(lengths: &[usize]) -> Segments {
        Segments {
            rows: lengths.iter().map(|length| vec![*length]).collect(),
        }
    }

    /// Rows of several sequences each; empty segments are dropped.
    pub fn packed(rows: Vec<Vec<usize>>) -> Segments {
        Segments {
            rows: rows
                .into_iter()
                .map(|row| row.into_iter().filter(|length| *length > 0).collect())
                .collect(),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Real (not padding) tokens of each row.
    pub fn lengths(&self) -> Vec<usize> {
        self.rows.iter().map(|row| row.iter().sum()).collect()
    }

    /// Whether some row holds more than one sequence.
    pub fn is_packed(&self) -> bool {
        self.rows.iter().any(|row| row.len() > 1)
    }

    /// Each position's index within its sequence, B·L of them; padding continues the
    /// row's last sequence.
    pub fn positions(&self, len: usize) -> Vec<u32> {
        let mut positions = Vec::with_capacity(self.rows.len() * len);
        for row in &self.rows {
            let mut filled = 0;
            for length in row {
                let length = (*length).min(len - filled);
                positions.extend(0..length as u32);
                filled += length;
            }
            let continued = row.last().map_or(0, |last| (*last).min(len)) as u32;
            positions.extend((0..(len - filled) as u32).map(|i| continued + i));
        }
        positions
    }

    /// Each position's sequence within its row, B·L of them; padding belongs to the last.
    pub fn sequence_ids(&self, len: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.rows.len() * len);
        for row in &self.rows {
            let row_start = ids.len();
            for (index, length) in row.iter().enumerate() {
                ids.extend(std::iter::repeat_n(index as u32, *length));
            }
            let last = row.len().saturating_sub(1) as u32;
            ids.resize(row_start + len, last);
        }
        ids
    }

    /// The start and end bounds for rows of `len` positions.
    pub(crate) fn bounds(&self, len: usize) -> candle_core::Result<Bounds> {
        let mut bounds = Bounds {
            starts: Vec::with_capacity(self.rows.len() * len),
            ends: Vec::with_capacity(self.rows.len() * len),
        };
        for row in &self.rows {
            let total: usize = row.iter().sum();
            if total > len {
                candle_core::bail!("segments of {total} tokens in a row of {len}");
            }
            let mut start = 0;
            for (index, length) in row.iter().enumerate() {
                let last = index + 1 == row.len();
                let end = if last { len } else { start + length };
                bounds
                    .starts
                    .extend(std::iter::repeat_n(start as u32, *length));
                bounds.ends.extend(std::iter::repeat_n(end as u32, *length));
                if !last {
                    start += length;
                }
            }
            let padding = len - total;
            bounds
                .starts
                .extend(std::iter::repeat_n(start as u32, padding));
            bounds.ends.extend(std::iter::repeat_n(len as u32, padding));
        }
        Ok(bounds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_keep_sequences_apart() -> candle_core::Result<()> {
        let segments = Segments::packed(vec![vec![2, 3], vec![4]]);
        let bounds = segments.bounds(6)?;
        assert_eq!(bounds.starts, [0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bounds.ends, [2, 2, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6]);
        assert_eq!(segments.positions(6), [0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]);
        assert_eq!(
            segments.sequence_ids(6),
            [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(segments.lengths(), [5, 4]);
        assert!(segments.is_packed());
        assert!(!Segments::unpacked(&[3, 1]).is_packed());
        let error = segments.bounds(4).expect_err("5 tokens in 4");
        assert!(
            error.to_string().contains("5 tokens in a row of 4"),
            "{error}"
        );
        Ok(())
    }
}
