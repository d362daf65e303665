//! The pure core of the flow engine: no database, no clock of its own (every
//! function takes `now`), no I/O. Everything the engine decides is decided here
//! and unit-tested here.

pub(crate) mod condition;
pub(crate) mod decide;
pub(crate) mod definition;
pub mod events;
pub(crate) mod failure;
pub(crate) mod plan;
pub(crate) mod schedule;
pub(crate) mod state;
pub mod template;
pub(crate) mod validate;
