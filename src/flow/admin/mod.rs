//! Operating flows: manual operations (each an event with who and why, refused
//! if the instance moved since the operator looked), incident acknowledgements,
//! and queries (instances with filters and keyset pagination, counts, incidents).

mod ops;
mod query;

pub use ops::{MAX_SIGNAL_ID, Operator, Signal};
pub use query::{
    Incident, IncidentFilter, IncidentGroup, InstanceCursor, InstanceFilter, InstanceSummary,
    ParseInstanceCursorError, StatusCount, incident_id, parse_incident_id,
};
