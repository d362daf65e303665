//! Compile-time checks: the public futures and streams can cross threads.

use dcbflow::{EventStream, Query, ReadOptions, Store};

fn is_send<T: Send>(_: &T) {}
fn is_send_static<T: Send + 'static>() {}

#[allow(dead_code)]
fn futures_and_streams_are_send(store: Store) {
    is_send_static::<EventStream>();
    is_send_static::<Store>();
    is_send(&store.append(vec![], None));
    let q = Query::all();
    is_send(&store.read(&q, ReadOptions::default()));
    is_send(&store.read_all(&q, ReadOptions::default()));
    is_send(&store.read_last(&q));
    is_send(&store.head());
    is_send(&store.migrate());
}

#[test]
fn store_is_sync() {
    fn is_sync<T: Sync>() {}
    is_sync::<Store>();
}
