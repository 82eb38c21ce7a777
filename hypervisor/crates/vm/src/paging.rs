//! Walking a guest's own page tables (4-level IA-32e paging, SDM 4.5) to turn a guest-linear
//! address into a guest-physical one, for instructions the hypervisor emulates on the guest's
//! behalf (string I/O). Reads the tables through [`GuestMemory`], so a guest table that lies
//! outside the VM's memory is an error here, never a host access.

use crate::memory::{AccessError, GuestMemory, PhysMemory};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The access being translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub write: bool,
    /// CPL 3.
    pub user: bool,
    /// CR0.WP: supervisor writes honour read-only pages.
    pub write_protect: bool,
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The CPU would raise #PF with this error code (SDM 4.7: bit 0 protection violation,
    /// bit 1 write, bit 2 user).
    PageFault { error_code: u32 },
    /// A paging-structure entry could not be read (outside the VM's memory, or a page the
    /// memory engine holds).
    Table(AccessError),
}

/// Translates `linear` under the guest's CR3 (`cr3`, 4-level paging).
pub fn translate(
    mem: &GuestMemory,
    phys: &impl PhysMemory,
    cr3: u64,
    linear: u64,
    access: Access,
) -> Result<u64, WalkError> {
    let fault = |protection: bool| WalkError::PageFault {
        error_code: u32::from(protection)
            | (u32::from(access.write) << 1)
            | (u32::from(access.user) << 2),
    };
    if !crate::msr::is_canonical(linear) {
        // A non-canonical address raises #GP, not #PF; string I/O is never emulated with one
        // because the CPU checks it before the VM exit.
        return Err(fault(false));
    }
    let mut table = cr3 & ADDRESS_MASK;
    let mut writable = true;
    let mut user = true;
    for level in (0..4).rev() {
        let index = (linear >> (12 + 9 * level)) & 0x1ff;
        let mut raw = [0u8; 8];
        mem.read(phys, table + index * 8, &mut raw)
            .map_err(WalkError::Table)?;
        let entry = u64::from_le_bytes(raw);
        if entry & PRESENT == 0 {
            return Err(fault(false));
        }
        writable &= entry & WRITABLE != 0;
        user &= entry & USER != 0;
        let leaf = level == 0 || (entry & PAGE_SIZE_BIT != 0 && (level == 1 || level == 2));
        if leaf {
            let page_mask = (1u64 << (12 + 9 * level)) - 1;
            if (access.user && !user)
                || (access.write && !writable && (access.user || access.write_protect))
            {
                return Err(fault(true));
            }
            return Ok((entry & ADDRESS_MASK & !page_mask) | (linear & page_mask));
        }
        table = entry & ADDRESS_MASK;
    }
    unreachable!("level 0 is always a leaf")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::FlatPhys;
    use alloc::vec::Vec;

    /// A 64 KiB VM identity-mapped with one PML4 (0x1000), PDPT (0x2000), PD (0x3000) and PT
    /// (0x4000): 4 KiB pages for the first 2 MiB; page 5 read-only, page 6 not present, page 7
    /// user; 2 MiB pages above.
    fn vm() -> (GuestMemory, FlatPhys) {
        let frames: Vec<u64> = (0..16).map(|i| i * 4096).collect();
        let mem = GuestMemory::new(frames);
        let mut phys = FlatPhys(alloc::vec![0; 16 * 4096]);
        let mut put = |gpa: u64, v: u64| mem.write(&mut phys, gpa, &v.to_le_bytes()).unwrap();
        put(0x1000, 0x2000 | 7);
        put(0x2000, 0x3000 | 3);
        put(0x3000, 0x4000 | 3);
        put(0x3008, 0x20_0000 | PAGE_SIZE_BIT | 3);
        for page in 0..16u64 {
            let flags = match page {
                5 => PRESENT,
                6 => 0,
                7 => 7,
                _ => 3,
            };
            put(0x4000 + page * 8, (page * 4096) | flags);
        }
        (mem, phys)
    }

    const READ: Access = Access {
        write: false,
        user: false,
        write_protect: true,
    };
    const WRITE: Access = Access {
        write: true,
        ..READ
    };

    #[test]
    fn identity_pages_translate() {
        let (mem, phys) = vm();
        assert_eq!(translate(&mem, &phys, 0x1000, 0x8123, READ), Ok(0x8123));
        assert_eq!(translate(&mem, &phys, 0x1000, 0x5010, READ), Ok(0x5010));
        // A 2 MiB page keeps the low 21 bits.
        assert_eq!(
            translate(&mem, &phys, 0x1000, 0x21_2345, READ),
            Ok(0x21_2345)
        );
    }

    #[test]
    fn faults_carry_the_cpus_error_code() {
        let (mem, phys) = vm();
        assert_eq!(
            translate(&mem, &phys, 0x1000, 0x6000, READ),
            Err(WalkError::PageFault { error_code: 0 })
        );
        assert_eq!(
            translate(&mem, &phys, 0x1000, 0x5000, WRITE),
            Err(WalkError::PageFault { error_code: 3 })
        );
        // Without CR0.WP a supervisor write to a read-only page succeeds.
        let no_wp = Access {
            write_protect: false,
            ..WRITE
        };
        assert_eq!(translate(&mem, &phys, 0x1000, 0x5000, no_wp), Ok(0x5000));
        // User access: only page 7 is user at every level... but the PDPT/PD entries are not,
        // so even page 7 faults with the protection bit.
        let user = Access { user: true, ..READ };
        assert_eq!(
            translate(&mem, &phys, 0x1000, 0x7000, user),
            Err(WalkError::PageFault { error_code: 5 })
        );
        // Nothing mapped at 512 GiB (PML4 entry 1 is zero).
        assert_eq!(
            translate(&mem, &phys, 0x1000, 1 << 39, READ),
            Err(WalkError::PageFault { error_code: 0 })
        );
    }

    #[test]
    fn tables_outside_memory_are_errors_not_host_reads() {
        let (mem, phys) = vm();
        assert!(matches!(
            translate(&mem, &phys, 0x10_0000, 0, READ),
            Err(WalkError::Table(_))
        ));
    }
}
