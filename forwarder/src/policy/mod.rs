//! Traffic policy decided at accept/connect time, so both relay paths get it:
//! access control, schedules, per-source limits, balancing and health, PROXY protocol.

pub mod access;
pub mod balance;
pub mod clock;
pub mod health;
pub mod proxy_protocol;
pub mod schedule;
pub mod slots;
pub mod sources;
