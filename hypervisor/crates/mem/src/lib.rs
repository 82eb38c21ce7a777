//! Memory multiplexing engine (work in progress, see issue 3).
#![no_std]
