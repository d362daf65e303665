//! Queries, cursors and append conditions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::event::{Event, Position, SequencedEvent, TransactionId};

/// Selects events. A query is "all events" or a list of items, OR'd together.
///
/// An event matches an item when its type is one of the item's types (an item with
/// no types accepts any type) **and** its tags contain all of the item's tags (an
/// item with no tags accepts any tags). This is the DCB specification's semantics.
///
/// ```
/// use dcbflow::{Query, QueryItem};
/// // Enrolments in course c1, OR anything about student s7.
/// let q = Query::from_items([
///     QueryItem::new().types(["StudentEnrolled"]).tags(["course:c1"]),
///     QueryItem::new().tags(["student:s7"]),
/// ]);
/// assert_eq!(q.items().len(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Query {
    items: Vec<QueryItem>,
}

impl Query {
    /// Matches every event.
    pub fn all() -> Self {
        Query {
            items: vec![QueryItem::new()],
        }
    }

    /// A query from items, OR'd. An empty list matches nothing.
    pub fn from_items(items: impl IntoIterator<Item = QueryItem>) -> Self {
        Query {
            items: items.into_iter().collect(),
        }
    }

    /// A single-item query: events of one of `types` carrying all of `tags`.
    pub fn items_of<T, S, G, U>(types: T, tags: G) -> Self
    where
        T: IntoIterator<Item = S>,
        S: Into<String>,
        G: IntoIterator<Item = U>,
        U: Into<String>,
    {
        Query::from_items([QueryItem::new().types(types).tags(tags)])
    }

    /// Adds an item (OR).
    #[must_use]
    pub fn or(mut self, item: QueryItem) -> Self {
        self.items.push(item);
        self
    }

    /// The items.
    pub fn items(&self) -> &[QueryItem] {
        &self.items
    }

    /// `true` if some item matches every event.
    pub fn is_all(&self) -> bool {
        self.items.iter().any(QueryItem::is_all)
    }

    /// `true` if the query has no items and so matches nothing.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether `event` matches this query (evaluated in memory, same semantics as the store).
    pub fn matches(&self, event: &Event) -> bool {
        self.items.iter().any(|i| i.matches(event))
    }

    /// Whether a stored event matches this query.
    pub fn matches_sequenced(&self, event: &SequencedEvent) -> bool {
        self.matches(&event.event)
    }
}

/// One item of a [`Query`]: types OR'd, tags AND'd.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueryItem {
    /// Event types, any of which matches. Empty: any type.
    #[serde(default)]
    pub types: Vec<String>,
    /// Tags, all of which an event must carry. Empty: any tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl QueryItem {
    /// An item matching every event; narrow it with [`types`](Self::types) and [`tags`](Self::tags).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds accepted types.
    #[must_use]
    pub fn types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.types.extend(types.into_iter().map(Into::into));
        self
    }

    /// Adds required tags.
    #[must_use]
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// `true` if the item has neither types nor tags.
    pub fn is_all(&self) -> bool {
        self.types.is_empty() && self.tags.is_empty()
    }

    /// Whether `event` matches this item.
    pub fn matches(&self, event: &Event) -> bool {
        (self.types.is_empty() || self.types.contains(&event.event_type))
            && self.tags.iter().all(|t| event.tags.contains(t))
    }
}

/// A PostgreSQL snapshot (`pg_snapshot`): which transactions a read could see.
///
/// Transactions below `xmin` had finished, those at or above `xmax` had not started,
/// and `xip` lists the ones in progress in between.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Snapshot {
    /// Oldest transaction still in progress.
    pub xmin: TransactionId,
    /// First transaction id not yet assigned.
    pub xmax: TransactionId,
    /// Transactions in progress, sorted.
    pub xip: Vec<TransactionId>,
}

impl Snapshot {
    /// Checks that PostgreSQL could have produced this snapshot: `xmin <= xmax`,
    /// every in-progress id within `[xmin, xmax)`, sorted and without repeats.
    ///
    /// # Errors
    /// What is wrong with it.
    pub fn check(&self) -> Result<(), String> {
        // PostgreSQL's 64-bit transaction ids are at least 1 and below 2^63.
        if self.xmin.0 == 0 || self.xmax.0 > i64::MAX as u64 {
            return Err(format!(
                "snapshot ids must be 1 to 2^63 - 1 (xmin {}, xmax {})",
                self.xmin, self.xmax
            ));
        }
        if self.xmin > self.xmax {
            return Err(format!("snapshot xmin {} > xmax {}", self.xmin, self.xmax));
        }
        if let Some(x) = self
            .xip
            .iter()
            .find(|x| **x < self.xmin || **x >= self.xmax)
        {
            return Err(format!(
                "snapshot in-progress id {x} outside [{}, {})",
                self.xmin, self.xmax
            ));
        }
        if self.xip.windows(2).any(|w| w[0] >= w[1]) {
            return Err("snapshot in-progress ids not sorted and distinct".into());
        }
        Ok(())
    }

    /// Whether the changes of `xid` were visible in this snapshot (assuming it committed).
    pub fn is_visible(&self, xid: TransactionId) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

/// Error parsing a [`Snapshot`] or [`Cursor`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed cursor or snapshot: {0:?}")]
pub struct ParseCursorError(String);

impl FromStr for Snapshot {
    type Err = ParseCursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseCursorError(s.to_owned());
        let mut parts = s.splitn(3, ':');
        let num = |p: Option<&str>| -> Result<u64, ParseCursorError> {
            p.ok_or_else(err)?.parse().map_err(|_| err())
        };
        let xmin = num(parts.next())?;
        let xmax = num(parts.next())?;
        let rest = parts.next().ok_or_else(err)?;
        let mut xip = Vec::new();
        if !rest.is_empty() {
            for x in rest.split(',') {
                xip.push(TransactionId(x.parse().map_err(|_| err())?));
            }
        }
        xip.sort_unstable();
        xip.dedup();
        let snapshot = Snapshot {
            xmin: TransactionId(xmin),
            xmax: TransactionId(xmax),
            xip,
        };
        snapshot.check().map_err(|_| err())?;
        Ok(snapshot)
    }
}

/// Where a read ended: the last position it returned and the snapshot it read in.
///
/// Use it as [`AppendCondition::after`] so the append fails on every matching event
/// the read did not see, including events of transactions that had taken an earlier
/// position but not yet committed when the read ran ("late committers").
///
/// A cursor has a stable text form (`Display` / `FromStr`, also used by serde) so it
/// can travel through an HTTP API: `"<position>@<xmin>:<xmax>:<xip,...>"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Cursor {
    /// Last position the read covered (`None`: from the start of the log).
    pub position: Option<Position>,
    /// The read's snapshot. `None` for a cursor made from a bare position, which
    /// cannot detect late committers: prefer cursors returned by reads.
    pub snapshot: Option<Snapshot>,
}

impl Cursor {
    /// A cursor from a bare position, without a snapshot.
    ///
    /// An append condition after such a cursor only sees events with a greater
    /// position; it cannot know about transactions that were in flight when the
    /// caller read. Use the cursor of a [`read`](crate::Store::read) where possible.
    pub fn at(position: Position) -> Self {
        Cursor {
            position: Some(position),
            snapshot: None,
        }
    }
}

impl From<Position> for Cursor {
    fn from(p: Position) -> Self {
        Cursor::at(p)
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.position {
            write!(f, "{p}")?;
        }
        if let Some(s) = &self.snapshot {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

impl FromStr for Cursor {
    type Err = ParseCursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (pos, snap) = match s.split_once('@') {
            Some((p, s)) => (p, Some(s)),
            None => (s, None),
        };
        let position = if pos.is_empty() {
            None
        } else {
            let p: i64 = pos.parse().map_err(|_| ParseCursorError(s.to_owned()))?;
            if p < 0 {
                return Err(ParseCursorError(s.to_owned()));
            }
            Some(Position(p))
        };
        let snapshot = snap.map(str::parse).transpose()?;
        Ok(Cursor { position, snapshot })
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// "Fail if any event matching this query exists that I did not see."
///
/// ```
/// use dcbflow::{AppendCondition, Query};
/// // Nothing may exist yet for account 42 (no cursor: any matching event fails).
/// let c = AppendCondition::new(Query::items_of(["AccountOpened"], ["account:42"]));
/// assert!(c.after.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AppendCondition {
    /// The events that would invalidate the decision.
    pub fail_if_events_match: Query,
    /// What the decision saw. `None`: every matching event counts.
    pub after: Option<Cursor>,
}

impl AppendCondition {
    /// A condition failing on any event matching `query`.
    pub fn new(query: Query) -> Self {
        AppendCondition {
            fail_if_events_match: query,
            after: None,
        }
    }

    /// Only events the reader behind `cursor` did not see count.
    #[must_use]
    pub fn after(mut self, cursor: impl Into<Cursor>) -> Self {
        self.after = Some(cursor.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn item_semantics() {
        let e = Event::new("A", ["x:1", "y:2"], json!({}));
        assert!(QueryItem::new().matches(&e));
        assert!(QueryItem::new().types(["B", "A"]).matches(&e));
        assert!(!QueryItem::new().types(["B"]).matches(&e));
        assert!(QueryItem::new().tags(["x:1", "y:2"]).matches(&e));
        assert!(!QueryItem::new().tags(["x:1", "z:3"]).matches(&e));
        assert!(Query::all().matches(&e));
        assert!(!Query::default().matches(&e));
        let q = Query::from_items([
            QueryItem::new().tags(["z:3"]),
            QueryItem::new().types(["A"]),
        ]);
        assert!(q.matches(&e), "items are OR'd");
    }

    #[test]
    fn cursor_round_trips_as_text() {
        let c = Cursor {
            position: Some(Position(12)),
            snapshot: Some("10:20:11,15".parse().unwrap()),
        };
        let s = c.to_string();
        assert_eq!(s, "12@10:20:11,15");
        assert_eq!(s.parse::<Cursor>().unwrap(), c);
        assert_eq!("".parse::<Cursor>().unwrap(), Cursor::default());
        assert!("x@1:2:".parse::<Cursor>().is_err());
        assert!("5@9:2:".parse::<Cursor>().is_err());
        let snap = c.snapshot.unwrap();
        assert!(snap.is_visible(TransactionId(9)));
        assert!(!snap.is_visible(TransactionId(11)));
        assert!(snap.is_visible(TransactionId(12)));
        assert!(!snap.is_visible(TransactionId(20)));
    }
}
