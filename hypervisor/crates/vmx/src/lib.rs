//! VT-x rules as data: everything about VMX that can be decided without executing a VMX
//! instruction, so that `cargo test` checks it on the host.
//!
//! - [`caps`]: the capability MSRs and the negotiation of every VM-execution, VM-exit and
//!   VM-entry control word from them (SDM Vol. 3C, Appendix A.3-A.5), CR0/CR4 fixed bits (A.7-A.8).
//! - [`controls`]: the control bits we use, by name, with their SDM sections.
//! - [`fields`]: VMCS field encodings (SDM Vol. 3D, Appendix B).
//! - [`ept`]: the 4-level EPT builder, permissions and a walker (SDM Vol. 3C, 29.3).
//! - [`exit`]: basic exit reasons and exit-qualification decoding (SDM Vol. 3C, 28.2 and
//!   Appendix C).
//!
//! This crate must not execute VMX instructions or touch physical memory directly: the kernel's
//! thin VMX layer does that, and hands memory to [`ept`] through the [`ept::FrameSource`] trait.
#![no_std]

pub mod caps;
pub mod controls;
pub mod ept;
pub mod exit;
pub mod fields;
