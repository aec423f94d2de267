//! Reads status changes in sequence order without skipping any, even though on PostgreSQL
//! sequence numbers are taken before commit and so can become visible out of order.
//!
//! Everything at or below `cursor` has been published. Changes above it are published as
//! they appear and remembered, and the cursor only moves over a gap once the gap has been
//! there for [`GAP_PATIENCE`]: by then its transaction has either committed (and was read)
//! or rolled back (and the number will never appear).

use crate::controller::store::{StatusChange, Store, StoreResult};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::Instant;

/// How long a missing sequence number is waited for before it is taken to be rolled back.
const GAP_PATIENCE: Duration = Duration::from_secs(10);
/// Rows read per query.
const PAGE: i64 = 500;

pub(super) struct StatusReader {
    cursor: i64,
    /// Published sequence numbers above the cursor.
    published_above: BTreeSet<i64>,
    /// The gap just above the cursor, and since when it has been seen.
    gap: Option<(i64, Instant)>,
}

impl StatusReader {
    pub(super) fn new(cursor: i64) -> Self {
        Self {
            cursor,
            published_above: BTreeSet::new(),
            gap: None,
        }
    }

    /// Publishes every change not yet published, in sequence order.
    pub(super) async fn read_new(
        &mut self,
        store: &Store,
        mut publish: impl FnMut(StatusChange),
    ) -> StoreResult<()> {
        let mut after = self.cursor;
        loop {
            let page = store.status_changes_after(after, PAGE).await?;
            let full = page.len() as i64 == PAGE;
            for change in page {
                after = change.sequence;
                if self.published_above.insert(change.sequence) {
                    publish(change);
                }
            }
            if !full {
                break;
            }
        }
        self.advance(Instant::now());
        Ok(())
    }

    fn advance(&mut self, now: Instant) {
        loop {
            while self.published_above.remove(&(self.cursor + 1)) {
                self.cursor += 1;
            }
            let Some(&next) = self.published_above.first() else {
                self.gap = None;
                return;
            };
            // Numbers cursor+1 .. next-1 are missing.
            let missing = self.cursor + 1;
            match self.gap {
                Some((at, since)) if at == missing => {
                    if now.duration_since(since) < GAP_PATIENCE {
                        return;
                    }
                    self.cursor = next - 1;
                    self.gap = None;
                }
                _ => {
                    self.gap = Some((missing, now));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_waits_at_a_gap_then_moves_past_it_once_patience_runs_out() {
        let mut reader = StatusReader::new(10);
        let start = Instant::now();
        for n in [11, 12, 14, 15] {
            reader.published_above.insert(n);
        }
        reader.advance(start);
        assert_eq!(reader.cursor, 12);
        assert_eq!(reader.gap.map(|g| g.0), Some(13));

        // 13 commits late: it is read, and the cursor moves on.
        reader.published_above.insert(13);
        reader.advance(start + Duration::from_secs(1));
        assert_eq!(reader.cursor, 15);
        assert!(reader.gap.is_none());

        // 16 never comes (rolled back): the cursor waits, then skips it.
        reader.published_above.insert(17);
        reader.advance(start + Duration::from_secs(2));
        assert_eq!(reader.cursor, 15);
        reader.advance(start + Duration::from_secs(2) + GAP_PATIENCE);
        assert_eq!(reader.cursor, 17);
        assert!(reader.published_above.is_empty());
    }
}
