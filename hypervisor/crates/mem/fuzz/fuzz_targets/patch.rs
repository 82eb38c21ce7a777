//! Arbitrary bytes as a patch (runs or XOR, by the first byte): never a panic, and decoding
//! against a reference and applying in place agree.
#![no_main]

use hv_mem::{patch, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let reference: [u8; PAGE_SIZE] = core::array::from_fn(|i| (i * 7 % 251) as u8);
    let mut decoded = [0u8; PAGE_SIZE];
    let d = patch::decode(data, &reference, &mut decoded);
    let mut page = reference;
    let a = patch::apply(data, &mut page);
    assert_eq!(d.is_ok(), a.is_ok(), "decode {d:?}, apply {a:?}");
    if d.is_ok() {
        assert!(decoded == page, "decode and apply differ");
    }
});
