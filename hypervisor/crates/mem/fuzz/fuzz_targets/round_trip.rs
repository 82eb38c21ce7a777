//! Any page content (the input repeated to a page) and a reference derived from it: LZ4, runs
//! and XOR encodings all decode back to exactly the page.
#![no_main]

use hv_mem::{compress, patch, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let page: [u8; PAGE_SIZE] = core::array::from_fn(|i| data[i % data.len()]);
    // The reference: the page with every 97th byte changed and a stretch zeroed.
    let mut reference = page;
    for b in reference.iter_mut().step_by(97) {
        *b = b.wrapping_add(1);
    }
    reference[1000..1000 + data.len().min(300)].fill(0);

    let mut out = [0u8; PAGE_SIZE];
    let mut lz = vec![0u8; compress::MAX_COMPRESSED];
    let n = compress::compress(&page, &mut lz, compress::MAX_COMPRESSED).expect("worst case fits");
    compress::decompress(&lz[..n], &mut out).expect("own output decodes");
    assert!(out == page, "LZ4 round trip");

    let mut buf = vec![0u8; 3 * PAGE_SIZE];
    let n = patch::encode(&page, &reference, &mut buf).expect("runs patch fits");
    patch::decode(&buf[..n], &reference, &mut out).expect("runs patch decodes");
    assert!(out == page, "runs round trip");

    let n = patch::encode_xor(&page, &reference, &mut buf, 3 * PAGE_SIZE).expect("XOR patch fits");
    patch::decode(&buf[..n], &reference, &mut out).expect("XOR patch decodes");
    assert!(out == page, "XOR round trip");
});
