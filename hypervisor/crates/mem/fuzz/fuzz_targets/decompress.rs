//! Arbitrary bytes into the page decompressor: never a panic, and exactly `lz4_flex`'s verdict
//! and output (a page, or an error).
#![no_main]

use hv_mem::{compress, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut ours = [0u8; PAGE_SIZE];
    let ours_ok = compress::decompress(data, &mut ours).is_ok();
    let mut theirs = [0u8; PAGE_SIZE];
    let theirs_ok = matches!(
        lz4_flex::block::decompress_into(data, &mut theirs),
        Ok(PAGE_SIZE)
    );
    assert_eq!(ours_ok, theirs_ok, "verdicts differ");
    if ours_ok {
        assert!(ours == theirs, "pages differ");
    }
});
