//! Reads a change log (status changes, token revocations) in sequence order without skipping
//! any, even though on PostgreSQL sequence numbers are taken before commit and so can become
//! visible out of order.
//!
//! Everything at or below `cursor` has been published; changes above it are published as
//! they appear and remembered. Numbers are taken in increasing order, so when number `h` is
//! first seen at time `t`, every smaller number was taken before `t`. Once [`GAP_PATIENCE`]
//! has passed since `t`, a smaller number still missing belongs to a transaction that rolled
//! back (or has run for longer than any healthy one), and the cursor moves up to `h`. Every
//! gap below `h` is waited out at once, not one after another.

use crate::controller::store::StoreResult;
use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How long a missing sequence number is waited for before it is taken to be rolled back.
const GAP_PATIENCE: Duration = Duration::from_secs(10);
/// Rows read per query.
const PAGE: i64 = 500;

pub(super) struct SequenceReader {
    cursor: i64,
    /// Published sequence numbers above the cursor.
    published_above: BTreeSet<i64>,
    /// The highest number seen by each read that raised it, and when: the cursor may move
    /// up to one of these once it is older than [`GAP_PATIENCE`].
    checkpoints: VecDeque<(i64, Instant)>,
}

impl SequenceReader {
    /// A reader whose first read covers numbers above `after`. Starting a little below the
    /// newest number at start-up catches changes other controllers were still committing.
    pub(super) fn new(after: i64) -> Self {
        Self {
            cursor: after,
            published_above: BTreeSet::new(),
            checkpoints: VecDeque::new(),
        }
    }

    /// Publishes every change not yet published, in sequence order. `fetch(after, limit)`
    /// reads up to `limit` changes numbered above `after`, oldest first.
    pub(super) async fn read_new<T, Fetched>(
        &mut self,
        mut fetch: impl FnMut(i64, i64) -> Fetched,
        sequence: impl Fn(&T) -> i64,
        mut publish: impl FnMut(T),
    ) -> StoreResult<()>
    where
        Fetched: Future<Output = StoreResult<Vec<T>>>,
    {
        let mut after = self.cursor;
        loop {
            let page = fetch(after, PAGE).await?;
            let full = page.len() as i64 == PAGE;
            for change in page {
                after = sequence(&change);
                if self.published_above.insert(after) {
                    publish(change);
                }
            }
            if !full {
                break;
            }
        }
        self.seen_up_to(after, Instant::now());
        self.advance(Instant::now());
        Ok(())
    }

    fn seen_up_to(&mut self, highest: i64, now: Instant) {
        let newest = self.checkpoints.back().map_or(self.cursor, |(h, _)| *h);
        if highest > newest {
            self.checkpoints.push_back((highest, now));
        }
    }

    fn advance(&mut self, now: Instant) {
        while let Some(&(highest, seen_at)) = self.checkpoints.front() {
            if now.duration_since(seen_at) < GAP_PATIENCE {
                break;
            }
            self.checkpoints.pop_front();
            if highest > self.cursor {
                self.cursor = highest;
                self.published_above = self.published_above.split_off(&(highest + 1));
            }
        }
        while self.published_above.remove(&(self.cursor + 1)) {
            self.cursor += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(reader: &mut SequenceReader, numbers: &[i64], at: Instant) {
        for n in numbers {
            reader.published_above.insert(*n);
        }
        if let Some(highest) = numbers.iter().max() {
            reader.seen_up_to(*highest, at);
        }
        reader.advance(at);
    }

    #[test]
    fn the_cursor_waits_out_every_gap_below_a_number_at_once() {
        let start = Instant::now();
        let mut reader = SequenceReader::new(10);
        read(&mut reader, &[11, 12, 14, 16, 17], start);
        assert_eq!(reader.cursor, 12);

        // 13 commits late: the cursor moves on to the next gap.
        read(&mut reader, &[13], start + Duration::from_secs(1));
        assert_eq!(reader.cursor, 14);

        // 15 never comes (rolled back). Both it and any other gap below 17 are given up
        // together once 17 has been seen for the patience.
        read(
            &mut reader,
            &[],
            start + GAP_PATIENCE - Duration::from_millis(1),
        );
        assert_eq!(reader.cursor, 14);
        read(&mut reader, &[], start + GAP_PATIENCE);
        assert_eq!(reader.cursor, 17);
        assert!(reader.published_above.is_empty());
    }

    #[test]
    fn numbers_seen_later_get_their_own_patience() {
        let start = Instant::now();
        let mut reader = SequenceReader::new(0);
        read(&mut reader, &[2], start);
        read(&mut reader, &[5], start + Duration::from_secs(5));
        read(&mut reader, &[], start + GAP_PATIENCE);
        // 1 is given up (2 was seen long enough ago); 3 and 4 are still awaited.
        assert_eq!(reader.cursor, 2);
        read(
            &mut reader,
            &[3, 4],
            start + GAP_PATIENCE + Duration::from_secs(1),
        );
        assert_eq!(reader.cursor, 5);
    }
}
