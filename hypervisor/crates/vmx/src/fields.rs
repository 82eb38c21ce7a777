//! VMCS field encodings (SDM Vol. 3D, Appendix B), only those this hypervisor uses.

// 16-bit control and guest/host selector fields (B.1).
pub const VPID: u32 = 0x0000;
pub const GUEST_ES_SELECTOR: u32 = 0x0800;
pub const GUEST_CS_SELECTOR: u32 = 0x0802;
pub const GUEST_SS_SELECTOR: u32 = 0x0804;
pub const GUEST_DS_SELECTOR: u32 = 0x0806;
pub const GUEST_FS_SELECTOR: u32 = 0x0808;
pub const GUEST_GS_SELECTOR: u32 = 0x080a;
pub const GUEST_LDTR_SELECTOR: u32 = 0x080c;
pub const GUEST_TR_SELECTOR: u32 = 0x080e;
pub const HOST_ES_SELECTOR: u32 = 0x0c00;
pub const HOST_CS_SELECTOR: u32 = 0x0c02;
pub const HOST_SS_SELECTOR: u32 = 0x0c04;
pub const HOST_DS_SELECTOR: u32 = 0x0c06;
pub const HOST_FS_SELECTOR: u32 = 0x0c08;
pub const HOST_GS_SELECTOR: u32 = 0x0c0a;
pub const HOST_TR_SELECTOR: u32 = 0x0c0c;

// 64-bit control fields (B.2.1).
pub const IO_BITMAP_A: u32 = 0x2000;
pub const IO_BITMAP_B: u32 = 0x2002;
pub const MSR_BITMAP: u32 = 0x2004;
pub const EXIT_MSR_STORE_ADDR: u32 = 0x2006;
pub const EXIT_MSR_LOAD_ADDR: u32 = 0x2008;
pub const ENTRY_MSR_LOAD_ADDR: u32 = 0x200a;
pub const TSC_OFFSET: u32 = 0x2010;
pub const TSC_MULTIPLIER: u32 = 0x2032;
pub const EPT_POINTER: u32 = 0x201a;
// 64-bit read-only data (B.2.2).
pub const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;
// 64-bit guest state (B.2.3).
pub const VMCS_LINK_POINTER: u32 = 0x2800;
pub const GUEST_IA32_DEBUGCTL: u32 = 0x2802;
pub const GUEST_IA32_PAT: u32 = 0x2804;
pub const GUEST_IA32_EFER: u32 = 0x2806;
/// The guest's PAE PDPTEs (loaded and saved by VM entry and exit with EPT, SDM 25.4.2).
pub const GUEST_PDPTE0: u32 = 0x280a;
pub const HOST_IA32_PAT: u32 = 0x2c00;
// 64-bit host state (B.2.4).
pub const HOST_IA32_EFER: u32 = 0x2c02;

// 32-bit control fields (B.3.1).
pub const PIN_BASED_CONTROLS: u32 = 0x4000;
pub const PRIMARY_PROC_BASED_CONTROLS: u32 = 0x4002;
pub const EXCEPTION_BITMAP: u32 = 0x4004;
pub const CR3_TARGET_COUNT: u32 = 0x400a;
pub const EXIT_CONTROLS: u32 = 0x400c;
pub const EXIT_MSR_STORE_COUNT: u32 = 0x400e;
pub const EXIT_MSR_LOAD_COUNT: u32 = 0x4010;
pub const ENTRY_CONTROLS: u32 = 0x4012;
pub const ENTRY_MSR_LOAD_COUNT: u32 = 0x4014;
pub const ENTRY_INTERRUPTION_INFO: u32 = 0x4016;
pub const ENTRY_EXCEPTION_ERROR_CODE: u32 = 0x4018;
pub const ENTRY_INSTRUCTION_LENGTH: u32 = 0x401a;
pub const SECONDARY_PROC_BASED_CONTROLS: u32 = 0x401e;
// 32-bit read-only data (B.3.2).
pub const VM_INSTRUCTION_ERROR: u32 = 0x4400;
pub const EXIT_REASON: u32 = 0x4402;
pub const EXIT_INTERRUPTION_INFO: u32 = 0x4404;
pub const EXIT_INTERRUPTION_ERROR_CODE: u32 = 0x4406;
pub const IDT_VECTORING_INFO: u32 = 0x4408;
pub const IDT_VECTORING_ERROR_CODE: u32 = 0x440a;
pub const EXIT_INSTRUCTION_LENGTH: u32 = 0x440c;
pub const EXIT_INSTRUCTION_INFO: u32 = 0x440e;
// 32-bit guest state (B.3.3).
pub const GUEST_ES_LIMIT: u32 = 0x4800;
pub const GUEST_CS_LIMIT: u32 = 0x4802;
pub const GUEST_SS_LIMIT: u32 = 0x4804;
pub const GUEST_DS_LIMIT: u32 = 0x4806;
pub const GUEST_FS_LIMIT: u32 = 0x4808;
pub const GUEST_GS_LIMIT: u32 = 0x480a;
pub const GUEST_LDTR_LIMIT: u32 = 0x480c;
pub const GUEST_TR_LIMIT: u32 = 0x480e;
pub const GUEST_GDTR_LIMIT: u32 = 0x4810;
pub const GUEST_IDTR_LIMIT: u32 = 0x4812;
pub const GUEST_ES_ACCESS_RIGHTS: u32 = 0x4814;
pub const GUEST_CS_ACCESS_RIGHTS: u32 = 0x4816;
pub const GUEST_SS_ACCESS_RIGHTS: u32 = 0x4818;
pub const GUEST_DS_ACCESS_RIGHTS: u32 = 0x481a;
pub const GUEST_FS_ACCESS_RIGHTS: u32 = 0x481c;
pub const GUEST_GS_ACCESS_RIGHTS: u32 = 0x481e;
pub const GUEST_LDTR_ACCESS_RIGHTS: u32 = 0x4820;
pub const GUEST_TR_ACCESS_RIGHTS: u32 = 0x4822;
pub const GUEST_INTERRUPTIBILITY_STATE: u32 = 0x4824;
pub const GUEST_ACTIVITY_STATE: u32 = 0x4826;
pub const GUEST_SYSENTER_CS: u32 = 0x482a;
pub const PREEMPTION_TIMER_VALUE: u32 = 0x482e;
// 32-bit host state (B.3.4).
pub const HOST_IA32_SYSENTER_CS: u32 = 0x4c00;

// Natural-width control fields (B.4.1).
pub const CR0_GUEST_HOST_MASK: u32 = 0x6000;
pub const CR4_GUEST_HOST_MASK: u32 = 0x6002;
pub const CR0_READ_SHADOW: u32 = 0x6004;
pub const CR4_READ_SHADOW: u32 = 0x6006;
// Natural-width read-only data (B.4.2).
pub const EXIT_QUALIFICATION: u32 = 0x6400;
pub const GUEST_LINEAR_ADDRESS: u32 = 0x640a;
// Natural-width guest state (B.4.3).
pub const GUEST_CR0: u32 = 0x6800;
pub const GUEST_CR3: u32 = 0x6802;
pub const GUEST_CR4: u32 = 0x6804;
pub const GUEST_ES_BASE: u32 = 0x6806;
pub const GUEST_CS_BASE: u32 = 0x6808;
pub const GUEST_SS_BASE: u32 = 0x680a;
pub const GUEST_DS_BASE: u32 = 0x680c;
pub const GUEST_FS_BASE: u32 = 0x680e;
pub const GUEST_GS_BASE: u32 = 0x6810;
pub const GUEST_LDTR_BASE: u32 = 0x6812;
pub const GUEST_TR_BASE: u32 = 0x6814;
pub const GUEST_GDTR_BASE: u32 = 0x6816;
pub const GUEST_IDTR_BASE: u32 = 0x6818;
pub const GUEST_DR7: u32 = 0x681a;
pub const GUEST_RSP: u32 = 0x681c;
pub const GUEST_RIP: u32 = 0x681e;
pub const GUEST_RFLAGS: u32 = 0x6820;
pub const GUEST_PENDING_DEBUG_EXCEPTIONS: u32 = 0x6822;
pub const GUEST_SYSENTER_ESP: u32 = 0x6824;
pub const GUEST_SYSENTER_EIP: u32 = 0x6826;
// Natural-width host state (B.4.4).
pub const HOST_CR0: u32 = 0x6c00;
pub const HOST_CR3: u32 = 0x6c02;
pub const HOST_CR4: u32 = 0x6c04;
pub const HOST_FS_BASE: u32 = 0x6c06;
pub const HOST_GS_BASE: u32 = 0x6c08;
pub const HOST_TR_BASE: u32 = 0x6c0a;
pub const HOST_GDTR_BASE: u32 = 0x6c0c;
pub const HOST_IDTR_BASE: u32 = 0x6c0e;
pub const HOST_IA32_SYSENTER_ESP: u32 = 0x6c10;
pub const HOST_IA32_SYSENTER_EIP: u32 = 0x6c12;
pub const HOST_RSP: u32 = 0x6c14;
pub const HOST_RIP: u32 = 0x6c16;
