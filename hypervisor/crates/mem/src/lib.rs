//! Memory multiplexing engine (docs: see below).
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod arena;
mod backend;
pub mod compress;
mod config;
mod engine;
mod error;
pub mod index;
pub mod page;
pub mod patch;
mod plain;
mod stats;

pub use backend::{
    Access, DomainId, Frame, Gfn, Mapping, MemoryBackend, OutOfFrames, Page, VmId, PAGE_SIZE,
};
pub use config::Config;
pub use engine::{Engine, FaultResolution, ScanReport};
pub use error::{CorruptKind, Error};
pub use plain::{access_read, access_write, GuestFault, PlainMemory, SPARE_FRAMES};
pub use stats::{Counters, Stats};
