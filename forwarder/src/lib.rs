//! forwarder: a Linux TCP port forwarder.
//!
//! `cli` and `config` describe what to do, `server` owns listeners, limits and shutdown,
//! `connection` owns one pair's lifecycle, and `relay` holds the two ways bytes move.

pub mod cli;
pub mod config;
pub mod connection;
pub mod deadlines;
pub mod fd_waiters;
pub mod inspect;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod privileges;
pub mod relay;
pub mod server;
pub mod sys;
pub mod systemd;
pub mod tunnel;
