//! Group commit: concurrent appends of one process batched into one transaction.
//!
//! A writer task takes the requests waiting in a queue (up to `max_batch`) and runs
//! them in one transaction: it takes the store lock **exclusively** (every append
//! holds it shared, so this waits for all writers in flight, in any process, and
//! keeps new ones out), then calls `append_events` once per request, pipelined in one
//! round trip and without per-scope locks. Each call checks its own condition with a
//! fresh snapshot, so later requests see the events of earlier ones, and a request
//! whose condition fails gets its own `Conflict` while the others commit. One commit,
//! one WAL flush, one notification for the whole batch.
//!
//! If a call fails with an error (not a conflict), the batch is rolled back and its
//! requests are run one by one the ordinary way, so one bad request fails alone.

use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};

use super::append::{PreparedAppend, decode};
use super::{AppendResult, Pool};
use crate::error::{Error, Result};

struct Request {
    append: PreparedAppend,
    reply: oneshot::Sender<Result<AppendResult>>,
}

/// The queue to the writer task; the task ends when the store is dropped.
pub(crate) struct GroupCommit {
    sender: mpsc::Sender<Request>,
}

struct Writer {
    pool: Pool,
    append_sql: String,
    store_key: i64,
    max_batch: usize,
}

impl GroupCommit {
    pub(crate) fn start(pool: Pool, append_sql: String, store_key: i64, max_batch: usize) -> Self {
        let (sender, receiver) = mpsc::channel(max_batch * 4);
        let writer = Writer {
            pool,
            append_sql,
            store_key,
            max_batch,
        };
        tokio::spawn(writer.run(receiver));
        GroupCommit { sender }
    }

    pub(crate) async fn append(&self, append: PreparedAppend) -> Result<AppendResult> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request { append, reply })
            .await
            .map_err(|_| Error::Config("the group-commit writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| Error::Config("the group-commit writer has stopped".into()))?
    }
}

impl Writer {
    async fn run(self, mut receiver: mpsc::Receiver<Request>) {
        while let Some(first) = receiver.recv().await {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match receiver.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            tracing::trace!(size = batch.len(), "group commit");
            self.commit(batch).await;
        }
    }

    async fn commit(&self, batch: Vec<Request>) {
        let results = match self.together(&batch).await {
            Ok(results) => results,
            Err(e) if e.is_ambiguous => {
                let message = e.error.to_string();
                for r in batch {
                    let _ = r.reply.send(Err(Error::CommitUnknown(message.clone())));
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e.error, "group commit failed, appending one by one");
                return self.one_by_one(batch).await;
            }
        };
        for (r, result) in batch.into_iter().zip(results) {
            let _ = r.reply.send(result);
        }
    }

    /// The whole batch in one transaction; `Err` if it must be retried one by one.
    async fn together(
        &self,
        batch: &[Request],
    ) -> std::result::Result<Vec<Result<AppendResult>>, Failed> {
        let mut client = self.pool.get().await.map_err(Failed::retry)?;
        let tx = client.transaction().await.map_err(Failed::retry)?;
        let stmt = tx
            .prepare_cached(&self.append_sql)
            .await
            .map_err(Failed::retry)?;
        // The lock first, on its own: only once it is granted may the appends run
        // (a pipelined lock statement that still needs parsing would be overtaken
        // by the already-prepared appends).
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&self.store_key])
            .await
            .map_err(Failed::retry)?;
        let params: Vec<_> = batch.iter().map(|r| r.append.params(false)).collect();
        let rows = join_all(params.iter().map(|p| tx.query_one(&stmt, p))).await;
        let mut results = Vec::with_capacity(rows.len());
        for row in rows {
            results.push(decode(&row.map_err(Failed::retry)?));
        }
        tx.commit().await.map_err(|e| Failed {
            is_ambiguous: true,
            error: e.into(),
        })?;
        Ok(results)
    }

    async fn one_by_one(&self, batch: Vec<Request>) {
        for r in batch {
            let result = async {
                let client = self.pool.get().await?;
                let stmt = client.prepare_cached(&self.append_sql).await?;
                let row = client.query_one(&stmt, &r.append.params(true)).await?;
                decode(&row)
            }
            .await;
            let _ = r.reply.send(result);
        }
    }
}

struct Failed {
    is_ambiguous: bool,
    error: Error,
}

impl Failed {
    fn retry(e: impl Into<Error>) -> Failed {
        Failed {
            is_ambiguous: false,
            error: e.into(),
        }
    }
}
